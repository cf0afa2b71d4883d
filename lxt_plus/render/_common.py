"""What every renderer needs: row selection, display strings, header fields."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

import torch

from lxt_plus.errors import InputError, MissingDependencyError
from lxt_plus.results.conservation import conservation_kind
from lxt_plus.results.words import NEWLINE_SYMBOL, aggregate_words, detect_scheme, display_token

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


def _names(items: list[tuple[str, float]]) -> str:
    return ", ".join(f"{text.strip() or repr(text)!s} ({value:+.3g})" for text, value in items)


def summary_line(
    exp: Explanation, r: int, k: int = 3, colored: bool = True, hide_special: bool = False
) -> str:
    """One sentence in plain words for row ``r``: what pushed the prediction up (red), what pushed
    it down (blue), and how much of the logit each group carries. For pixels: the parts of the
    image (the model's patches, or 4×4-pixel blocks) instead of tokens. ``colored=False`` names
    the signs instead of the colours (for text without colour)."""
    up_mark, down_mark = ("red", "blue") if colored else ("+", "-")
    target = exp.targets[r]
    what = repr(target.label) + (
        f" over {target.contrast_label!r}" if target.contrast_label is not None else ""
    )
    if exp.modality == "pixels":
        images = exp[r].images
        rel = exp.batch_relevance[r].detach().float().cpu()
        size = (images.patch_size if images is not None else None) or 4
        from lxt_plus.results.images import pool_patches

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
        ranked = torch.argsort(values, descending=True).tolist()
        up = [(texts[i], float(values[i])) for i in ranked[:k] if values[i] > 0]
        down = [(texts[i], float(values[i])) for i in ranked[::-1][:k] if values[i] < 0]
        unit = "tokens"
    pos, neg = float(values.clamp(min=0).sum()), float(values.clamp(max=0).sum())
    parts = [f"Pushing {what} up ({up_mark}): {_names(up)}" if up else f"Nothing pushes {what} up"]
    parts.append(f"pushing it down ({down_mark}): {_names(down)}" if down else "nothing pushes it down")
    logit = float(exp.target_logit[r])
    return (
        "; ".join(parts)
        + f". The {unit} for it carry {pos:+.3g} and those against it {neg:+.3g} of the explained logit {logit:.3g}."
    )


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
