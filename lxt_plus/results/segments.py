"""Relevance by segment: sentences, paragraphs, or spans the user names (retrieved passages).

For a long prompt the question is which passage supported the answer, not which of thousands of
tokens did. A segment's relevance is the sum of its tokens' relevance (LRP relevance is additive,
so segment sums conserve like token sums do); its share is that sum over the row's total.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from lxt_plus.errors import InputError
from lxt_plus.results.words import NEWLINE_SYMBOL, display_token, is_special

__all__ = ["Segment", "Segments", "segment_tokens"]

BY = ("sentence", "paragraph", "token")
OTHER = "(other)"
_SENTENCE_END = re.compile(r"[.!?…。！？][\"'”’)\]]*\s*$")


@dataclass(frozen=True)
class Segment:
    """One segment: its text, its tokens ``[start, end)`` in the row, and its relevance."""

    text: str
    start: int
    end: int
    relevance: float
    share: float  # relevance / the row's total relevance (0 when the total is 0)
    name: str = ""

    def __str__(self) -> str:
        label = f"{self.name}: " if self.name else ""
        text = self.text if len(self.text) <= 60 else self.text[:57] + "..."
        where = f" tokens {self.start}-{self.end}" if self.start >= 0 else ""
        return f"{label}{text!r}{where}: {self.relevance:+.4g} ({self.share:+.1%})"


class Segments(list[Segment]):  # type: ignore[misc]
    """The segments of one row, in text order, with views and rankings."""

    def __init__(self, items: Sequence[Segment], by: str) -> None:
        super().__init__(items)
        self.by = by

    @property
    def relevance(self) -> torch.Tensor:
        """Each segment's relevance, in text order."""
        return torch.tensor([s.relevance for s in self], dtype=torch.float64)

    @property
    def other(self) -> Segment | None:
        """With spans or passages: the tokens outside all of them (the question, the template)."""
        return next((s for s in self if s.name == OTHER), None)

    def ranked(self) -> list[Segment]:
        """The segments by relevance, largest first (without :attr:`other`)."""
        return sorted((s for s in self if s.name != OTHER), key=lambda s: s.relevance, reverse=True)

    def top(self, k: int = 1) -> list[Segment]:
        return self.ranked()[:k]

    def to_html(self) -> str:
        """Each segment on its own line, coloured by its relevance on the token scale."""
        from lxt_plus.render.html import segments_html

        return segments_html(self)

    def _repr_html_(self) -> str:
        return self.to_html()

    def to_terminal(self, **kwargs: Any) -> str:
        """One line per segment: relevance, share and the start of its text (``color=False``: plain)."""
        from lxt_plus.render.terminal import segments_terminal

        return segments_terminal(self, **kwargs)

    def to_dict(self) -> dict[str, Any]:
        return {"by": self.by, "segments": [s.__dict__.copy() for s in self]}

    def __repr__(self) -> str:
        lines = [f"Segments(by={self.by!r}, {len(self)} segments)"] + [f"  {s}" for s in self]
        return "\n".join(lines)


def _texts(tokens: Sequence[str]) -> list[str]:
    return [display_token(t).replace(NEWLINE_SYMBOL, "\n") for t in tokens]


def _boundaries(texts: list[str], by: str) -> list[int]:
    """Token indices where a new segment starts: after a sentence end or a line break (sentences),
    or a blank line (paragraphs). Whitespace tokens after a boundary stay with the segment before."""
    starts = [0]
    for i, t in enumerate(texts[:-1]):
        if by == "token":
            cut = True
        elif by == "sentence":
            cut = bool(_SENTENCE_END.search(t)) or "\n" in t
        else:
            cut = "\n\n" in t or (t.endswith("\n") and texts[i + 1].startswith("\n"))
        if not cut:
            continue
        j = i + 1
        while by != "token" and j < len(texts) and not texts[j].strip():
            j += 1
        if j < len(texts):
            starts.append(j)
    return sorted(set(starts))


def _passage_spans(texts: list[str], passages: Sequence[str]) -> list[tuple[int, int]]:
    """The token range ``[start, end)`` of each passage, found in the text the tokens spell
    (whitespace-insensitive, in order); a passage that is not there is an error."""
    norm = [re.sub(r"\s+", "", t) for t in texts]
    offsets, pos = [], 0
    for t in norm:
        offsets.append(pos)
        pos += len(t)
    joined = "".join(norm)
    spans, search_from = [], 0
    for p in passages:
        needle = re.sub(r"\s+", "", p)
        at = joined.find(needle, search_from) if needle else -1
        if at < 0:
            raise InputError(
                f"passage {p[:40]!r} is not in the explained text (passages are matched in order, "
                "ignoring whitespace); pass token ranges with spans= instead"
            )
        end_char = at + len(needle)
        start = max(i for i, o in enumerate(offsets) if o <= at)
        end = next((i for i, o in enumerate(offsets) if o >= end_char), len(texts))
        spans.append((start, end))
        search_from = end_char
    return spans


def segment_tokens(
    tokens: Sequence[str],
    relevance: torch.Tensor,
    by: str = "sentence",
    spans: Sequence[tuple[int, int]] | None = None,
    passages: Sequence[str] | None = None,
    names: Sequence[str] | None = None,
) -> Segments:
    """Sum ``relevance`` (one value per token) over segments of ``tokens``.

    ``by``: ``"sentence"``, ``"paragraph"`` or ``"token"``; or ``spans``, token ranges
    ``[start, end)``; or ``passages``, strings found in the text in order (retrieved documents).
    With spans or passages, the tokens outside every one form an ``"(other)"`` segment, so the
    shares still add up to one. ``names`` label the spans or passages.
    """
    rel = relevance.detach().to(torch.float64).reshape(-1)
    if rel.numel() != len(tokens):
        raise InputError(f"{rel.numel()} relevance values for {len(tokens)} tokens")
    texts = _texts(tokens)
    total = float(rel.sum())
    if spans is not None and passages is not None:
        raise InputError("give spans= or passages=, not both")
    if passages is not None:
        spans = _passage_spans(texts, passages)
    named = spans is not None
    if spans is not None:
        ranges = [(int(a), int(b)) for a, b in spans]
        for a, b in ranges:
            if not 0 <= a < b <= len(tokens):
                raise InputError(f"span ({a}, {b}) is not a token range of this row (0-{len(tokens)})")
        label = list(names) if names is not None else [f"span {i}" for i in range(len(ranges))]
        if len(label) != len(ranges):
            raise InputError(f"{len(label)} names for {len(ranges)} spans")
        by = "spans" if passages is None else "passages"
    else:
        if by not in BY:
            raise InputError(f"by={by!r}: use one of {', '.join(BY)}, or spans= / passages=")
        starts = _boundaries(texts, by)
        ranges = list(zip(starts, [*starts[1:], len(tokens)], strict=True))
        label = [""] * len(ranges)

    def make(a: int, b: int, name: str) -> Segment:
        value = float(rel[a:b].sum())
        text = "".join(t for t, tok in zip(texts[a:b], tokens[a:b], strict=True) if not is_special(tok))
        return Segment(text.strip(), a, b, value, value / total if total else 0.0, name)

    items = [make(a, b, n) for (a, b), n in zip(ranges, label, strict=True)]
    if named:
        covered = torch.zeros(len(tokens), dtype=torch.bool)
        for a, b in ranges:
            covered[a:b] = True
        rest = float(rel[~covered].sum())
        if bool((~covered).any()):
            items.append(Segment("", -1, -1, rest, rest / total if total else 0.0, OTHER))
    return Segments(items, by)
