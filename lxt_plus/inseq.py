"""lxt_plus's LRP presets as inseq attribution methods.

Importing this module registers, for each preset named in :data:`METHODS`, a gradient attribution
method with inseq, backed by :class:`lxt_plus.captum.LRP`::

    import inseq
    import lxt_plus.inseq  # registers "lxt_attnlrp", "lxt_cp_lrp", "lxt_ah_lrp"

    model = inseq.load_model(hf_model, "lxt_attnlrp", tokenizer=tokenizer)
    out = model.attribute("The capital of France is", generation_args={"max_new_tokens": 3})

inseq attributes each generated token to the source (encoder-decoder models) and to the target
prefix, from the input embeddings; summed over the hidden dimension, a step's relevance equals
:func:`lxt_plus.explain` of that token given its prefix. :func:`register_method` adds a method
for any other preset (a registered name, a YAML path or a :class:`~lxt_plus.engine.plan.Preset`).

inseq is an optional dependency: ``pip install --no-deps inseq jaxtyping 'typeguard<=2.13.3'
treescope`` (its own metadata pins CUDA wheels that this feature does not need).
"""

from __future__ import annotations

from typing import Any

from lxt_plus.errors import MissingDependencyError

try:
    from inseq.attr.feat.gradient_attribution import GradientAttributionRegistry
except ImportError as exc:  # pragma: no cover - the test suite installs inseq
    raise MissingDependencyError(
        "lxt_plus.inseq needs inseq: pip install --no-deps inseq jaxtyping 'typeguard<=2.13.3' treescope"
    ) from exc

from lxt_plus.captum import LRP
from lxt_plus.engine.plan import Preset

__all__ = ["register_method", "METHODS"]

METHODS = {"lxt_attnlrp": "attnlrp", "lxt_cp_lrp": "cp-lrp", "lxt_ah_lrp": "ah-lrp"}
# inseq finds methods through ``__subclasses__``, which holds classes weakly: keep them alive here
_CLASSES: dict[str, type] = {}


def register_method(method_name: str, rules: str | Preset | dict[str, Any]) -> type:
    """Register an inseq attribution method ``method_name`` that runs lxt_plus with ``rules``.

    Parameters
    ----------
    method_name:
        The name to give ``inseq.load_model(model, method_name, ...)``.
    rules:
        Preset name, YAML path or :class:`~lxt_plus.engine.plan.Preset`.

    Returns
    -------
    type
        The new inseq attribution class (already registered: inseq finds its subclasses by name).
    """

    def __init__(self: Any, attribution_model: Any, **kwargs: Any) -> None:
        GradientAttributionRegistry.__init__(self, attribution_model)
        self.method = LRP(attribution_model, rules, model=attribution_model.model)

    doc = f"lxt_plus LRP with the {getattr(rules, 'name', rules)!r} rules, as an inseq method."
    cls = type(
        f"LxtPlus_{method_name}",
        (GradientAttributionRegistry,),
        {"method_name": method_name, "__init__": __init__, "__doc__": doc, "__module__": __name__},
    )
    _CLASSES[method_name] = cls
    return cls


for _name, _rules in METHODS.items():
    register_method(_name, _rules)
