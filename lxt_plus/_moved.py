"""Module ``__getattr__`` shims for import paths that moved (one release of grace).

``lxt_plus/rules.py`` and the other old homes hold only ``forward(...)``: reading a name from them
imports the new home, warns once per name with a ``DeprecationWarning`` that gives the new path,
and returns the object itself, so ``from lxt_plus.rules import Rule`` and
``lxt_plus.rules.Rule`` stay the very same class as ``lxt_plus.engine.rules.Rule``.
"""

from __future__ import annotations

import importlib
import warnings
from collections.abc import Callable
from typing import Any


def forward(old: str, new: str) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """The ``__getattr__`` and ``__dir__`` of the module ``old``, which moved to ``new``."""

    def __getattr__(name: str) -> Any:
        if name.startswith("__") and name.endswith("__"):
            raise AttributeError(name)
        target = importlib.import_module(new)
        try:
            value = getattr(target, name)
        except AttributeError:
            raise AttributeError(f"module {old!r} (now {new!r}) has no attribute {name!r}") from None
        warnings.warn(
            f"{old}.{name} moved to {new}.{name}; the old path works for one more release",
            DeprecationWarning,
            stacklevel=2,
        )
        return value

    def __dir__() -> list[str]:
        return sorted(dir(importlib.import_module(new)))

    return __getattr__, __dir__
