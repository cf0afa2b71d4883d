"""lxt_plus: Layer-wise Relevance Propagation for HuggingFace transformers.

Patch a model in place (per instance, reversibly) so that one ordinary backward pass yields LRP
relevance (AttnLRP, AH-LRP/CP-LRP), and get token-level explanations back.
"""

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


def __getattr__(name: str):  # lazily import the heavier entry points
    if name == "audit":
        from .audit import audit

        return audit
    if name == "explain_generation":
        from .generation import explain_generation

        return explain_generation
    if name == "evaluate":
        from .evaluate import evaluate

        return evaluate
    if name == "tune":
        from .tune import tune

        return tune
    raise AttributeError(f"module 'lxt_plus' has no attribute {name!r}")
