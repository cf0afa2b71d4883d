"""Readable tokens: sub-word pieces merged into words, display strings and relevance normalisation."""

from __future__ import annotations

import re

import torch

from lxt_plus.errors import InputError

__all__ = ["aggregate_words", "detect_scheme", "display_token", "normalize"]

SCHEMES = ("auto", "wordpiece", "bpe", "sentencepiece")
NORMALIZATIONS = ("max", "sum", "none")
NEWLINE_SYMBOL = "\u21b5"  # ↵

# [CLS], [SEP], <s>, </s>, <pad>, <|im_start|>, <|begin_of_text|>, <0x0A> (SentencePiece byte fallback)
_SPECIAL = re.compile(r"^(\[[A-Z][A-Z0-9_]*\]|<[^<>\s]+>)$")


def is_special(tok: str) -> bool:
    """Whether ``tok`` looks like a special token (``[CLS]``, ``<s>``, ``<|im_start|>``, ...)."""
    return bool(_SPECIAL.match(tok))


def display_token(tok: str) -> str:
    """A raw token as readable text.

    Byte-level BPE ``Ġ`` and SentencePiece ``▁`` become spaces, a newline (``Ċ`` or ``\\n``) becomes
    ``↵`` and the WordPiece continuation mark ``##`` is dropped.

    Examples
    --------
    >>> display_token("Ġcat"), display_token("▁dog"), display_token("##ing"), display_token("Ċ")
    (' cat', ' dog', 'ing', '↵')
    """
    if tok.startswith("##") and len(tok) > 2:
        tok = tok[2:]
    return (
        tok.replace("\u0120", " ")
        .replace("\u2581", " ")
        .replace("\u010a", NEWLINE_SYMBOL)
        .replace("\r\n", NEWLINE_SYMBOL)
        .replace("\n", NEWLINE_SYMBOL)
    )


def detect_scheme(tokens: list[str]) -> str:
    """Guess the sub-word scheme of ``tokens``: ``"sentencepiece"``, ``"bpe"`` or ``"wordpiece"``.

    SentencePiece marks word starts with ``▁``; byte-level BPE with ``Ġ`` (or a plain leading space once
    decoded); otherwise tokens are treated as WordPiece, where ``##`` marks a continuation (a list with no
    marker at all then has one word per token).
    """
    if any(t.startswith("\u2581") for t in tokens):
        return "sentencepiece"
    if any(t.startswith(("\u0120", " ")) for t in tokens):
        return "bpe"
    return "wordpiece"


def _starts_word(tok: str, prev: str | None, scheme: str) -> bool:
    if prev is None or is_special(tok) or is_special(prev) or _is_break(prev) or _is_break(tok):
        return True
    if scheme == "wordpiece":
        return not (tok.startswith("##") and len(tok) > 2)
    if scheme == "bpe":
        return tok.startswith(("\u0120", " ", "\t"))
    return tok.startswith(("\u2581", " "))


def _is_break(tok: str) -> bool:
    """A whitespace-only token holding a newline: a word of its own."""
    text = display_token(tok)
    return NEWLINE_SYMBOL in text and not text.replace(NEWLINE_SYMBOL, "").strip()


def aggregate_words(
    tokens: list[str], relevance: torch.Tensor, scheme: str = "auto"
) -> tuple[list[str], torch.Tensor]:
    """Merge sub-word pieces into words and sum their relevance.

    Parameters
    ----------
    tokens:
        Raw token strings of one sequence (padding already removed), as from
        ``tokenizer.convert_ids_to_tokens`` or per-token decoding.
    relevance:
        ``(seq,)`` relevance of the tokens.
    scheme:
        ``"wordpiece"`` (``##`` continues a word), ``"bpe"`` (``Ġ`` or a leading space starts a word),
        ``"sentencepiece"`` (``▁`` starts a word) or ``"auto"`` (see :func:`detect_scheme`).
        Special tokens (``[CLS]``, ``<s>``, ``<|im_start|>``) and newlines are words of their own.

    Returns
    -------
    words, word_relevance:
        Clean word strings (no ``Ġ``/``▁``/``##`` marks) and their ``(n_words,)`` summed relevance.

    Examples
    --------
    >>> words, rel = aggregate_words(["The", "Ġc", "at"], torch.tensor([1.0, 2.0, 3.0]))
    >>> words, rel.tolist()
    (['The', 'cat'], [1.0, 5.0])
    """
    if scheme not in SCHEMES:
        raise InputError(f"unknown word scheme {scheme!r}; expected one of {', '.join(SCHEMES)}")
    if relevance.dim() != 1 or relevance.shape[0] != len(tokens):
        raise InputError(
            f"aggregate_words needs one relevance value per token: got {len(tokens)} tokens "
            f"and relevance of shape {tuple(relevance.shape)}"
        )
    if scheme == "auto":
        scheme = detect_scheme(tokens)
    pieces: list[list[str]] = []
    index: list[int] = []
    prev: str | None = None
    for tok in tokens:
        if _starts_word(tok, prev, scheme):
            pieces.append([])
        pieces[-1].append(tok)
        index.append(len(pieces) - 1)
        prev = tok
    words = []
    for group in pieces:
        text = "".join(display_token(t) for t in group)
        words.append(text.strip() or text)
    summed = torch.zeros(len(pieces), dtype=relevance.dtype, device=relevance.device)
    summed.index_add_(0, torch.tensor(index, dtype=torch.long, device=relevance.device), relevance)
    return words, summed


def normalize(relevance: torch.Tensor, method: str = "max") -> torch.Tensor:
    """Scale relevance for display.

    Parameters
    ----------
    relevance:
        Relevance of any shape; normalised as a whole.
    method:
        ``"max"`` divides by the largest ``|r|`` (result in ``[-1, 1]``), ``"sum"`` by the sum of ``|r|``,
        ``"none"`` leaves the values as they are. All-zero relevance stays zero.

    Examples
    --------
    >>> normalize(torch.tensor([2.0, -4.0, 0.0])).tolist()
    [0.5, -1.0, 0.0]
    """
    if method not in NORMALIZATIONS:
        raise InputError(f"unknown normalisation {method!r}; expected one of {', '.join(NORMALIZATIONS)}")
    rel = relevance if relevance.is_floating_point() else relevance.float()
    if method == "none" or rel.numel() == 0:
        return rel.clone()
    scale = rel.abs().max() if method == "max" else rel.abs().sum()
    return torch.zeros_like(rel) if scale == 0 else rel / scale
