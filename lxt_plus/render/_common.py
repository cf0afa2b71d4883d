"""What every renderer needs: row selection, display strings, header fields."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

import torch

from lxt_plus.errors import InputError, MissingDependencyError
from lxt_plus.render import colors
from lxt_plus.results.conservation import conservation_kind
from lxt_plus.results.images import patch_map
from lxt_plus.results.words import NEWLINE_SYMBOL, aggregate_words, detect_scheme, display_token
from lxt_plus.results.words import normalize as normalized

if TYPE_CHECKING:
    from lxt_plus.results.result import Explanation


def require(module: str, feature: str) -> Any:
    """Import an optional dependency or say how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        package = module.split(".")[0]
        raise MissingDependencyError(
            f"{feature} needs {package}; install it with "
            f"`pip install {package}` or `pip install lxt_plus[demo]`"
        ) from exc


def row_indices(exp: Explanation, row: int | None) -> list[int]:
    """Rows to render: ``row`` alone (range-checked), or every row of a batch when ``row`` is None."""
    n = len(exp)
    if row is None:
        return [0] if exp.single else list(range(n))
    if not -n <= row < n:
        raise InputError(f"row {row} is out of range for an explanation of {n} row(s)")
    return [row % n]


def row_items(
    exp: Explanation, r: int, words: bool = False, hide_special: bool = False
) -> tuple[list[str], torch.Tensor]:
    """Display strings and ``(n,)`` float relevance of row ``r`` (padding dropped, and special /
    chat-template tokens with ``hide_special``).

    Token strings keep their leading space; WordPiece word starts and merged words get one, so the
    strings concatenate to readable text.
    """
    if exp.modality == "pixels":
        raise InputError("pixel relevance has no tokens to show; plot it or save it as .png/.pdf/.svg")
    toks, rel = exp.real_tokens(r, hide_special)
    if exp.modality != "tokens":
        texts = [t if i == 0 else " " + t for i, t in enumerate(toks)]
    elif words:
        toks, rel = aggregate_words(toks, rel)
        texts = [t if i == 0 or toks[i - 1] == NEWLINE_SYMBOL else " " + t for i, t in enumerate(toks)]
    else:
        texts = [display_token(t) for t in toks]
        if detect_scheme(toks) == "wordpiece":
            texts = [
                s if i == 0 or (t.startswith("##") and len(t) > 2) else " " + s
                for i, (s, t) in enumerate(zip(texts, toks, strict=True))
            ]
    return texts, rel.detach().float().cpu()


def row_positions(
    exp: Explanation,
    r: int,
    rel: torch.Tensor,
    normalize: str,
    words: bool = False,
    hide_special: bool = False,
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The positional relevance of row ``r``'s shown tokens and its value in the colour scale of
    their relevance ``rel`` (clamped to ``[-1, 1]``), for the strip of position cells under the
    tokens; ``None`` when there is none to show (no positions, pixels, or merged words)."""
    if exp.modality == "pixels" or words:
        return None
    positions = exp.real_positions(r, hide_special)
    if positions is None or len(positions) != len(rel):
        return None
    positions = positions.detach().float()
    return positions, (positions / (colors.color_limit(rel, normalize) or 1.0)).clamp(-1, 1)


def header_fields(exp: Explanation, r: int) -> list[tuple[str, str]]:
    """(name, value) pairs describing row ``r``: target, preset, logit, probability, relevance sum."""
    fields = [
        ("target", exp.targets[r].describe()),
        ("preset", exp.rules),
        ("logit", f"{float(exp.target_logit[r]):.4g}"),
    ]
    if exp.probability is not None:
        fields.append(("p", f"{float(exp.probability[r]):.3g}"))
    total = float(exp.batch_relevance[r].detach().float().sum())
    fields.append(("relevance sum", f"{total:.4g}"))
    return fields


def legend_labels(limit: float) -> tuple[str, str, str]:
    """Labels of the legend's left end, middle and right end for colour limit ``limit``."""
    return f"-{limit:.3g}", "0", f"+{limit:.3g}"


def conservation_note(exp: Explanation, r: int) -> str:
    """One sentence on how much of row ``r``'s logit the input tokens got, and where the rest went."""
    c = exp[r].conservation
    total, logit, absorbed = (float(c[k]) for k in ("relevance_sum", "target_logit", "absorbed"))
    head = f"Relevance sum {total:.4g} of target logit {logit:.4g}"
    if c["position_relevance"] is not None:
        head += f" (position embeddings {float(c['position_relevance']):.4g})"
    kind = conservation_kind(exp.rules)
    if kind == "exact":
        return f"{head}: conserved up to float error ({absorbed:.2g})."
    if kind == "none":
        return f"{head}: plain Gradient×Input does not conserve; use an LRP preset."
    where = "biases and the softmax's bias term (AttnLRP)" if kind == "softmax" else "biases"
    return (
        f"{head}: the other {absorbed:.4g} went to {where}, not to tokens; it is not a leak. "
        "The conservative-check preset (biases zeroed) conserves exactly."
    )


def patch_overlay(
    pixels: torch.Tensor, relevance: torch.Tensor, patch_size: int | None, normalize: str
) -> torch.Tensor:
    """An image ``(C, H, W)`` overlaid with its relevance ``(H, W)``, pooled to the model's patches
    where it has them, on its own colour scale: ``(H, W, 3)`` (:func:`~lxt_plus.render.colors.overlay`)."""
    rel = relevance.detach().float().cpu()
    norm = normalized(patch_map(rel, patch_size) if patch_size else rel, normalize)
    return colors.overlay(pixels, norm, float(norm.abs().max()) or 1.0)
