"""lxt_plus: Layer-wise Relevance Propagation for HuggingFace transformers.

Patch a model in place (per instance, reversibly) so that one ordinary backward pass yields LRP
relevance (AttnLRP, AH-LRP/CP-LRP), and get token-level explanations back.
"""

from .audit import audit
from .errors import LxtPlusError
from .explain import explain
from .patching import Handle, patch, patched
from .plan import PRESETS, Preset, get_preset, load_preset
from .result import Explanation, GenerationExplanation, Target

__version__ = "0.1.0"

__all__ = [
    "patch", "patched", "explain", "explain_generation", "audit", "evaluate", "tune",
    "Handle", "Preset", "PRESETS", "get_preset", "load_preset", "Explanation",
    "GenerationExplanation", "Target", "LxtPlusError", "__version__",
]


_LAZY = {"explain_generation": "generation", "evaluate": "evaluate", "tune": "tune"}


def __getattr__(name: str):  # the heavier entry points are imported on first use
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value  # the submodule import bound the module under this name: rebind
        return value
    raise AttributeError(f"module 'lxt_plus' has no attribute {name!r}")
