"""Checks on token targets given as strings: the surprises a string target can hold.

A string target of a causal LM is tokenised, and what comes out is not always what was meant:

- it may split into **several tokens**; :func:`lxt_plus.explain` then explains the *sum of their
  logits* at the explained position (not the probability of the word);
- it may lack the **leading space** that a word has after another word: byte-level BPE vocabularies
  (GPT-2, Llama 3, SmolLM2, ...) hold ``"Paris"`` and ``" Paris"`` as different tokens, and after
  ``"The capital of France is"`` the model predicts ``" Paris"``;
- it may be a **class label** (``"POSITIVE"``) given to a causal LM, which has no labels: the
  string is explained as whatever tokens it splits into.

Each of these is a :class:`~lxt_plus.errors.TargetWarning` naming the tokens, or a
:class:`~lxt_plus.errors.TargetError` with ``strict_target=True``.
"""

from __future__ import annotations

import os
import re
import sys
import warnings
from collections.abc import Sequence
from typing import Any

from lxt_plus.errors import TargetError, TargetWarning

__all__ = ["check_token_target", "token_target_notes"]

_LABEL_LIKE = re.compile(r"^(?:LABEL_\d+|[A-Z][A-Z0-9_]{3,})$")
_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


def _pieces(tokenizer: Any, ids: Sequence[int]) -> list[str]:
    return [tokenizer.decode([i]) for i in ids]


def _encode(tokenizer: Any, text: str) -> tuple[int, ...]:
    return tuple(tokenizer.encode(text, add_special_tokens=False))


def token_target_notes(tokenizer: Any, spec: str, ids: Sequence[int]) -> list[str]:
    """What may surprise about the string target ``spec``, which ``tokenizer`` encodes as ``ids``.

    Returns
    -------
    list of str
        One sentence per finding (empty when the target is a single, unsurprising token).
    """
    ids = tuple(ids)
    notes = []
    if _LABEL_LIKE.match(spec):
        notes.append(
            "looks like a class label, but a causal LM has no labels: it is explained as the "
            f"token{'s' if len(ids) > 1 else ''} {_pieces(tokenizer, ids)}; explain labels with a "
            "sequence classifier (e.g. load_model('sentiment'), --model sentiment)"
        )
    elif len(ids) > 1:
        notes.append(
            f"splits into {len(ids)} tokens {_pieces(tokenizer, ids)} (ids {list(ids)}); their logits "
            "at the explained position are summed, which is not the probability of the word"
        )
    if spec[:1].isspace():
        return notes
    spaced = " " + spec
    spaced_ids = _encode(tokenizer, spaced)
    if spaced_ids and spaced_ids != ids and (len(spaced_ids) == 1 or len(spaced_ids) < len(ids)):
        what = "one token" if len(spaced_ids) == 1 else f"{len(spaced_ids)} tokens"
        lead = "is the token" if len(ids) == 1 else "has"
        found = (
            f"{_pieces(tokenizer, ids)[0]!r} without a leading space" if len(ids) == 1 else "no leading space"
        )
        notes.append(
            f"{lead} {found}, while {spaced!r} is {what} (ids {list(spaced_ids)}), the form a word "
            f"takes after another word: pass {spaced!r} if you meant that"
        )
    return notes


def _stacklevel() -> int:
    """Stack level of the first frame outside lxt_plus, so that a warning points at the caller."""
    frame = sys._getframe(1)
    level = 1
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(_PACKAGE_DIR + os.sep):
        frame = frame.f_back  # type: ignore[assignment]
        level += 1
    return level


def check_token_target(
    tokenizer: Any, spec: str, ids: Sequence[int], what: str = "target", strict: bool = False
) -> None:
    """Warn (:class:`TargetWarning`) or, with ``strict``, raise :class:`TargetError` about ``spec``.

    See :func:`token_target_notes` for what is checked. Token ids and unsurprising strings pass
    silently.
    """
    notes = token_target_notes(tokenizer, spec, ids)
    if not notes:
        return
    message = f"{what} {spec!r} " + "; it ".join(notes)
    if strict:
        raise TargetError(f"{message} (strict target: pass one unambiguous token, or a token id)")
    warnings.warn(message, TargetWarning, stacklevel=_stacklevel())
