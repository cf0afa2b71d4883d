"""The exceptions lxt_plus raises.

Every error is an :class:`LxtPlusError`; catch that one to handle them all.
Messages say what happened, where, what was expected and how to fix it.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable

__all__ = [
    "LxtPlusError",
    "UnsupportedModelError",
    "AlreadyPatchedError",
    "NotPatchedError",
    "PresetError",
    "ConfigError",
    "InputError",
    "TargetError",
    "NumericalError",
    "TokenizerMismatchError",
    "ContextTooLongError",
    "MissingDependencyError",
    "ConservationError",
    "OutOfMemoryError",
    "LxtPlusWarning",
    "TargetWarning",
    "nearest",
]


class LxtPlusError(Exception):
    """Base class of every error lxt_plus raises."""


class UnsupportedModelError(LxtPlusError):
    """The rule plan cannot account for some modules of the model."""


class AlreadyPatchedError(LxtPlusError):
    """The model is already patched (by lxt_plus with another plan, or by another library)."""


class NotPatchedError(LxtPlusError):
    """An operation needs a patched model, or a handle was removed twice."""


class PresetError(LxtPlusError, KeyError):
    """An unknown preset or rule name."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class ConfigError(LxtPlusError, ValueError):
    """A malformed rule configuration (YAML or dict)."""


class InputError(LxtPlusError, ValueError):
    """Inputs that cannot be explained (empty text, wrong dtype, wrong shape, ...)."""


class TargetError(LxtPlusError, ValueError):
    """A target that does not exist (unknown label or token, position out of range)."""


class NumericalError(LxtPlusError, FloatingPointError):
    """Relevance or logits came out as NaN or inf."""


class TokenizerMismatchError(InputError):
    """The tokenizer produces ids the model cannot embed."""


class ContextTooLongError(InputError):
    """The input is longer than the model's maximum number of positions."""


class MissingDependencyError(LxtPlusError, ImportError):
    """An optional package is needed for this feature."""


class ConservationError(LxtPlusError, AssertionError):
    """An audit found relevance leaking out of a module."""


class OutOfMemoryError(LxtPlusError, MemoryError):
    """The forward and backward pass did not fit in memory."""


class LxtPlusWarning(UserWarning):
    """Base class of every warning lxt_plus emits."""


class TargetWarning(LxtPlusWarning):
    """A target that is probably not what was meant: several tokens, a missing leading space, a class
    label given to a causal LM. ``strict_target=True`` (``--strict-target``) turns it into a
    :class:`TargetError`."""


def nearest(word: str, options: Iterable[str]) -> str:
    """The hint of an error message for a misspelt name: `` (did you mean 'x'?)`` or ``""``."""
    close = difflib.get_close_matches(word, list(options), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""
