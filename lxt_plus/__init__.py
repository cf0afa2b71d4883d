"""lxt_plus: Layer-wise Relevance Propagation for HuggingFace transformers.

Patch a model in place (per instance, reversibly) so that one ordinary backward pass yields LRP
relevance (AttnLRP, AH-LRP/CP-LRP), and get token-level explanations back.

Importing the package is cheap: torch and transformers are imported on first use of a name below
(so that ``lxt-plus --help`` and ``--version`` answer at once).
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

__all__ = [
    "patch",
    "patched",
    "explain",
    "explain_generation",
    "explain_similarity",
    "explore",
    "audit",
    "evaluate",
    "tune",
    "Handle",
    "Preset",
    "PRESETS",
    "get_preset",
    "list_presets",
    "load_preset",
    "list_rules",
    "register_rule",
    "Explanation",
    "GenerationExplanation",
    "Target",
    "LxtPlusError",
    "__version__",
]

# public name -> the submodule defining it
_LAZY = {
    "audit": "evaluation.audit",
    "LxtPlusError": "errors",
    "explain": "api.explain",
    "explain_generation": "api.generation",
    "explain_similarity": "api.similarity",
    "explore": "api.explore",
    "evaluate": "evaluation.evaluate",
    "tune": "evaluation.tune",
    "Handle": "engine.patching",
    "patch": "engine.patching",
    "patched": "engine.patching",
    "PRESETS": "engine.plan",
    "Preset": "engine.plan",
    "get_preset": "engine.plan",
    "list_presets": "engine.plan",
    "load_preset": "engine.plan",
    "list_rules": "engine.rules",
    "register_rule": "engine.rules",
    "Explanation": "results.result",
    "GenerationExplanation": "results.result",
    "Target": "results.result",
}

if TYPE_CHECKING:
    from lxt_plus.api.explain import explain
    from lxt_plus.api.explore import explore
    from lxt_plus.api.generation import explain_generation
    from lxt_plus.api.similarity import explain_similarity
    from lxt_plus.engine.patching import Handle, patch, patched
    from lxt_plus.engine.plan import PRESETS, Preset, get_preset, list_presets, load_preset
    from lxt_plus.engine.rules import list_rules, register_rule
    from lxt_plus.errors import LxtPlusError
    from lxt_plus.evaluation.audit import audit
    from lxt_plus.evaluation.evaluate import evaluate
    from lxt_plus.evaluation.tune import tune
    from lxt_plus.results.result import Explanation, GenerationExplanation, Target


class _Package(types.ModuleType):
    """The package module: a submodule import must not shadow the function of the same name.

    ``lxt_plus.explain`` (and ``audit``, ``evaluate``, ``tune``) is the function, as it was when
    this package imported everything eagerly; ``import lxt_plus.explain`` still registers the
    submodule in ``sys.modules``.
    """

    def __setattr__(self, name: str, value: Any) -> None:
        if isinstance(value, types.ModuleType) and _LAZY.get(name, "").rsplit(".", 1)[-1] == name:
            return
        super().__setattr__(name, value)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    if not name.startswith("_"):  # a submodule not imported yet: lxt_plus.rules, lxt_plus.models, ...
        try:
            return importlib.import_module(f".{name}", __name__)
        except ModuleNotFoundError as exc:
            if exc.name != f"{__name__}.{name}":
                raise
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


sys.modules[__name__].__class__ = _Package
