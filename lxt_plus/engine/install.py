"""How a rule takes effect on one module, and the undo steps that take it out again.

:meth:`lxt_plus.engine.rules.Rule.install` gets a :class:`Site` (the model, the module and its path)
and returns an :class:`Installed`: the route it took and its undo steps. The default replaces the
instance's ``forward`` with :func:`wrap_forward`; attention rules may instead register themselves
in :data:`ATTENTION_RULES`, which lxt_plus's attention-registry keys read at call time.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import nn

__all__ = ["Site", "Installed", "wrap_forward", "ATTENTION_RULES", "ROUTES"]

Undo = Callable[[], None]
ROUTES = ("forward", "registry", "ops", "none")

# attention module -> (its rule, the module's probe counters): read by the registry keys
ATTENTION_RULES: weakref.WeakKeyDictionary[nn.Module, tuple[Any, dict[str, int]]] = (
    weakref.WeakKeyDictionary()
)


@dataclass
class Site:
    """Where a rule is installed.

    Attributes
    ----------
    model:
        The model being patched.
    path:
        The module's path in ``model.named_modules()`` (``""`` for the model itself).
    module:
        The module.
    role:
        Its role (``"attention"``, ``"norm"``, ``"linear"``, ...; see :mod:`lxt_plus.engine.detect`).
    stats:
        Counters the rule's code increments when it runs (``"norm_hits"``, ``"attention_hits"``):
        the patch-time probe reads them to prove each rule saw its operation.
    force_ops:
        Attention rules: rule the inline operations even where the registry route exists (set
        when the probe found that the class does not dispatch through the registry).
    """

    model: nn.Module
    path: str
    module: nn.Module
    role: str
    stats: dict[str, int]
    force_ops: bool = False


@dataclass
class Installed:
    """What :meth:`~lxt_plus.engine.rules.Rule.install` did: the route and how to undo it.

    ``route`` is ``"forward"`` (instance forward replaced), ``"registry"`` (attention through
    transformers' registry), ``"ops"`` (inline attention operations), ``"none"`` (no change), or a name a custom rule
    chooses (``"forward hook"``), which ``Handle.describe`` prints.
    """

    route: str
    undo: list[Undo] = field(default_factory=list)

    @property
    def noop(self) -> bool:
        """Whether the module was left as it was."""
        return self.route == "none"


def wrap_forward(
    module: nn.Module, make: Callable[[Callable[..., Any]], Callable[..., Any] | None], undo: list[Undo]
) -> bool:
    """Replace ``module``'s instance forward by ``make(current forward)``; append the undo step.

    Returns ``False`` (and changes nothing) when ``make`` returns ``None``. Under accelerate's
    hooks the wrapped attribute is ``_old_forward``, which runs between loading and offloading the
    weights: rules that read parameters must run there.
    """
    attr = "_old_forward" if hasattr(module, "_hf_hook") and "_old_forward" in module.__dict__ else "forward"
    had = attr in module.__dict__
    previous = module.__dict__.get(attr)
    new = make(getattr(module, attr))
    if new is None:
        return False
    new.__lxt_plus__ = True  # type: ignore[attr-defined]
    setattr(module, attr, new)

    def restore() -> None:
        if had:
            setattr(module, attr, previous)
        else:
            delattr(module, attr)

    undo.append(restore)
    return True
