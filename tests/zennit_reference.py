"""zennit, the reference library for LRP rules, imported for the tests only.

zennit's wheel imports torchvision at import time for its ResNet canonizers. A torchvision wheel
that matches the CPU build of torch is not on PyPI, and a mismatched one breaks
``import transformers``, so zennit is installed with ``--no-deps``. When torchvision is absent,
zennit's import sees two placeholder classes that the LRP rules never use; the placeholders are
taken out of ``sys.modules`` again right after, so nothing else can see them.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types


def import_zennit() -> types.ModuleType:
    if importlib.util.find_spec("torchvision") is not None:
        return importlib.import_module("zennit")
    names = ("torchvision", "torchvision.models", "torchvision.models.resnet")
    stubs = {n: types.ModuleType(n) for n in names}
    for cls in ("Bottleneck", "BasicBlock"):
        setattr(stubs["torchvision.models.resnet"], cls, type(cls, (), {}))
    saved = {n: sys.modules.get(n) for n in names}
    sys.modules.update(stubs)
    try:
        import zennit.attribution
        import zennit.composites
        import zennit.rules  # noqa: F401

        return zennit
    finally:
        for n, m in saved.items():
            if m is None:
                sys.modules.pop(n, None)
            else:
                sys.modules[n] = m
