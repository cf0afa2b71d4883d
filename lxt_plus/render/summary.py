"""The plain-language sentence under every heatmap: what pushed the prediction up and down."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from lxt_plus.render._common import row_items
from lxt_plus.results.images import pool_patches

if TYPE_CHECKING:
    from lxt_plus.results.result import Explanation, GenerationExplanation
    from lxt_plus.results.segments import Segments

__all__ = ["generation_summary", "segments_summary", "summary_line"]


def _names(items: list[tuple[str, float]]) -> str:
    return ", ".join(f"{text.strip() or repr(text)!s} ({value:+.3g})" for text, value in items)


def summary_line(
    exp: Explanation, r: int, k: int = 3, colored: bool = True, hide_special: bool = False
) -> str:
    """One sentence in plain words for row ``r``: what pushed the prediction up (red), what pushed
    it down (blue), and how much of the logit each group carries. For pixels: the parts of the
    image (the model's patches, or 4×4-pixel blocks) instead of tokens. ``colored=False`` names
    the signs instead of the colours (for text without colour)."""
    target = exp.targets[r]
    what = repr(target.label) + (
        f" over {target.contrast_label!r}" if target.contrast_label is not None else ""
    )
    if exp.modality == "pixels":
        images = exp[r].images
        rel = exp.batch_relevance[r].detach().float().cpu()
        size = (images.patch_size if images is not None else None) or 4
        grid = pool_patches(rel, size)
        cols = grid.shape[-1]
        flat = grid.flatten()
        order = torch.argsort(flat, descending=True)
        up = [
            (f"patch at row {int(i) // cols}, column {int(i) % cols}", float(flat[i]))
            for i in order[:k]
            if flat[i] > 0
        ]
        down = [
            (f"patch at row {int(i) // cols}, column {int(i) % cols}", float(flat[i]))
            for i in order.flip(0)[:k]
            if flat[i] < 0
        ]
        values = rel
        unit = f"pixels ({size}×{size} patches)"
    else:
        texts, values = row_items(exp, r, hide_special=hide_special)
        up, down = _extremes(texts, values, k)
        unit = "tokens"
    line = _sentence(what, up, down, values, float(exp.target_logit[r]), unit, colored)
    if exp.modality == "tokens" and exp.images is not None:  # a vision-language model's images
        images = exp.images.of_row(r)
        if len(images.channels):
            line += _images_sentence(len(images.channels), float(images.relevance.sum()))
    return line + _positions_sentence(exp, r, hide_special)


def _extremes(
    texts: list[str], values: torch.Tensor, k: int
) -> tuple[list[tuple[str, float]], list[tuple[str, float]]]:
    """The ``k`` most positive and the ``k`` most negative items, each with its value."""
    ranked = torch.argsort(values, descending=True).tolist()
    up = [(texts[i], float(values[i])) for i in ranked[:k] if values[i] > 0]
    down = [(texts[i], float(values[i])) for i in ranked[::-1][:k] if values[i] < 0]
    return up, down


def _sentence(
    what: str,
    up: list[tuple[str, float]],
    down: list[tuple[str, float]],
    values: torch.Tensor,
    logit: float | None,
    unit: str,
    colored: bool,
) -> str:
    up_mark, down_mark = ("red", "blue") if colored else ("+", "-")
    pos, neg = float(values.clamp(min=0).sum()), float(values.clamp(max=0).sum())
    parts = [f"Pushing {what} up ({up_mark}): {_names(up)}" if up else f"Nothing pushes {what} up"]
    parts.append(f"pushing it down ({down_mark}): {_names(down)}" if down else "nothing pushes it down")
    of = "" if logit is None else f" of the explained logit {logit:.3g}"
    return "; ".join(parts) + f". The {unit} for it carry {pos:+.3g} and those against it {neg:+.3g}{of}."


def segments_summary(segs: Segments, k: int = 3, colored: bool = True) -> str:
    """:func:`summary_line` for segments: which passages (or sentences) pushed the prediction up
    and down, each named (or its first words), and how much the two groups carry."""
    names = [seg.name or (seg.text if len(seg.text) <= 40 else seg.text[:37] + "...") for seg in segs]
    values = segs.relevance
    up, down = _extremes(names, values, k)
    return _sentence("the prediction", up, down, values, None, "segments", colored)


def generation_summary(gen: GenerationExplanation, t: int, k: int = 3, colored: bool = True) -> str:
    """:func:`summary_line` for generated token ``t`` of a generation: what among the tokens before
    it (prompt and earlier generated tokens) pushed it up and down."""
    from lxt_plus.render._common import display_token

    seen = gen.prompt_length + t
    values = gen.matrix[t, :seen].detach().float().cpu()
    up, down = _extremes([display_token(x) for x in gen.tokens[:seen]], values, k)
    what = repr(display_token(gen.tokens[seen]))
    line = _sentence(what, up, down, values, float(gen.target_logit[t]), "tokens", colored)
    if gen.image_matrix is not None:
        line += _images_sentence(gen.image_matrix.shape[1], float(gen.image_matrix[t].sum()))
    return line


def _images_sentence(n: int, total: float) -> str:
    return f" The image carries {total:+.3g}." if n == 1 else f" The {n} images carry {total:+.3g}."


def _positions_sentence(exp: Explanation, r: int, hide_special: bool) -> str:
    """How much of the relevance is the positions' (PA-LRP), and which position carries most."""
    if exp.modality != "tokens":
        return ""
    positions = exp.real_positions(r, hide_special)
    if positions is None or not len(positions):
        return ""
    positions = positions.detach().float()
    texts, _ = row_items(exp, r, hide_special=hide_special)
    top = int(positions.abs().argmax())
    where = "included in the values above" if exp.pairs else "not included above"
    return (
        f" The positions carry {float(positions.sum()):+.3g} ({where}); the most, "
        f"{float(positions[top]):+.3g}, is at position {top} ({texts[top].strip() or repr(texts[top])})."
    )
