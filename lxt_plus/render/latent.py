"""Matplotlib figures of latent relevance (``explain(..., capture=...)``): layers, heads, patterns, neurons.

Every figure uses the shared diverging scale (red positive, blue negative, white zero) with
symmetric limits, and is built with :class:`matplotlib.figure.Figure` directly (no pyplot state).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from lxt_plus.errors import InputError
from lxt_plus.render import colors
from lxt_plus.render._common import require
from lxt_plus.results.words import display_token

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

    from lxt_plus.results.result import Explanation

__all__ = ["plot_layers", "plot_heads", "plot_head_pattern", "plot_neurons"]


def _figure(width: float, height: float) -> Figure:
    require("matplotlib", "plotting")
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def _get(exp: Explanation, key: str, row: int) -> torch.Tensor:
    if key not in exp.captures:
        raise InputError(f"this explanation has no {key!r} capture; explain with capture=({key!r},)")
    n = len(exp)
    if not -n <= row < n:
        raise InputError(f"row {row} is out of range for an explanation of {n} row(s)")
    return exp.captures[key][row].detach().float()


def _positions(exp: Explanation, row: int, seq: int) -> tuple[list[int], list[str]]:
    """Indices of the real (non-padding) positions and their labels."""
    mask = exp.attention_mask
    keep = (
        list(range(seq)) if mask is None or mask.shape[-1] != seq else mask[row].nonzero().flatten().tolist()
    )
    tokens = exp.tokens[row] if exp.modality == "tokens" and row < len(exp.tokens) else []
    if len(tokens) == seq:
        labels = [display_token(tokens[i]).strip() or "\u2423" for i in keep]
    else:
        labels = [str(i) for i in keep]
    return keep, labels


def _token_ticks(set_ticks: Any, seq: int, labels: list[str]) -> None:
    """Token labels under a heatmap: slanted when there are many, every one when they fit."""
    slanted = seq > 6
    set_ticks(
        range(seq),
        labels,
        family="monospace",
        fontsize=8,
        rotation=60 if slanted else 0,
        ha="right" if slanted else "center",
        rotation_mode="anchor",
    )


def _title(exp: Explanation, row: int, what: str) -> str:
    return f"{what} — target {exp.targets[row].describe()}, {exp.rules}"


def _heatmap(fig: Figure, ax: Axes, data: torch.Tensor, label: str) -> None:
    limit = float(data.abs().max()) or 1.0
    image = ax.imshow(
        (data / limit).numpy(),
        cmap=colors.colormap(),
        vmin=-1,
        vmax=1,
        aspect="auto",
        origin="lower",
        interpolation="nearest",
    )
    bar = fig.colorbar(image, ax=ax, shrink=0.8, pad=0.01)
    bar.set_ticks([-1, 0, 1], labels=[f"-{limit:.3g}", "0", f"+{limit:.3g}"])
    bar.set_label(label)


def plot_layers(exp: Explanation, row: int = 0, normalize: str = "layer") -> Figure:
    """Relevance of every token in the residual stream, layer by layer.

    Parameters
    ----------
    exp:
        Made with ``capture=("layers",)``.
    row:
        Row of a batch.
    normalize:
        ``"layer"``: each layer scaled by its own largest ``|relevance|`` (shows how relevance moves
        between tokens even when one token dominates); ``"global"``: one scale for the whole figure.

    Returns
    -------
    matplotlib.figure.Figure
        Layers bottom (embeddings) to top, tokens left to right.
    """
    data = _get(exp, "layers", row)
    keep, labels = _positions(exp, row, data.shape[-1])
    data = data[:, keep]
    if normalize == "layer":
        data = data / data.abs().amax(-1, keepdim=True).clamp_min(1e-30)
        label = "relevance / layer's max |relevance|"
    elif normalize == "global":
        label = "relevance"
    else:
        raise InputError(f"normalize must be 'layer' or 'global', got {normalize!r}")
    n_layers, seq = data.shape
    fig = _figure(max(6.0, 0.32 * seq + 2.5), max(3.0, 0.2 * n_layers + 1.6))
    ax = fig.add_subplot()
    _heatmap(fig, ax, data, label)
    _token_ticks(ax.set_xticks, seq, labels)
    step = max(1, n_layers // 16)
    ticks = list(range(0, n_layers, step))
    ax.set_yticks(ticks, ["emb" if i == 0 else str(i) for i in ticks], fontsize=8)
    ax.set_ylabel("layer (output)")
    ax.set_title(_title(exp, row, "Relevance in the residual stream"), fontsize=10)
    return fig


def plot_heads(exp: Explanation, row: int = 0) -> Figure:
    """Relevance flowing through each attention head: a layer × head grid.

    Parameters
    ----------
    exp:
        Made with ``capture=("heads",)``.
    row:
        Row of a batch.

    Returns
    -------
    matplotlib.figure.Figure
    """
    data = _get(exp, "heads", row)
    n_layers, n_heads = data.shape
    fig = _figure(max(4.0, 0.4 * n_heads + 2.5), max(3.0, 0.22 * n_layers + 1.4))
    ax = fig.add_subplot()
    _heatmap(fig, ax, data, "head relevance")
    ax.set_xticks(range(n_heads), [str(h) for h in range(n_heads)], fontsize=8)
    step = max(1, n_layers // 16)
    ax.set_yticks(range(0, n_layers, step), [str(i) for i in range(0, n_layers, step)], fontsize=8)
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    if n_layers * n_heads <= 64:
        limit = float(data.abs().max()) or 1.0
        for (i, h), v in zip(
            ((i, h) for i in range(n_layers) for h in range(n_heads)), data.flatten().tolist(), strict=True
        ):
            ax.text(
                h, i, f"{v:.2g}", ha="center", va="center", fontsize=7, color=colors.text_color(v / limit)
            )
    ax.set_title(_title(exp, row, "Relevance through attention heads"), fontsize=10)
    return fig


def plot_head_pattern(exp: Explanation, layer: int, head: int, row: int = 0) -> Figure:
    """Relevance from each key (column) to each query (row) through one head.

    Parameters
    ----------
    exp:
        Made with ``capture=("heads",)`` (see :func:`lxt_plus.api.capture.keep_patterns` for long inputs).
    layer, head:
        Which head; negative indices count from the end.
    row:
        Row of a batch.

    Returns
    -------
    matplotlib.figure.Figure
    """
    patterns = exp.captures.get("head_patterns") or {}
    n_layers = exp.captures["heads"].shape[1] if "heads" in exp.captures else 0
    index = layer % n_layers if n_layers and -n_layers <= layer < n_layers else layer
    if index not in patterns:
        kept = ", ".join(map(str, sorted(patterns))) or "none"
        raise InputError(
            f"no patterns for layer {layer} (kept: {kept}); explain with capture=('heads',) "
            "inside `with lxt_plus.api.capture.keep_patterns([layer]):`"
        )
    pattern = patterns[index][row].detach().float()
    if not -pattern.shape[0] <= head < pattern.shape[0]:
        raise InputError(f"head {head} is out of range: layer {index} has {pattern.shape[0]} heads")
    keep, labels = _positions(exp, row, pattern.shape[-1])
    data = pattern[head][keep][:, keep]
    seq = len(keep)
    size = max(4.0, 0.3 * seq + 2.5)
    fig = _figure(size + 1.0, size)
    ax = fig.add_subplot()
    _heatmap(fig, ax, data.flip(0), "relevance key → query")  # first query at the top
    _token_ticks(ax.set_xticks, seq, labels)
    ax.set_yticks(range(seq), labels[::-1], family="monospace", fontsize=8)
    ax.set_xlabel("key")
    ax.set_ylabel("query")
    ax.set_title(_title(exp, row, f"Layer {index}, head {head % pattern.shape[0]}"), fontsize=10)
    return fig


def plot_neurons(exp: Explanation, k: int = 20, row: int = 0) -> Figure:
    """The ``k`` MLP neurons with the largest ``|relevance|`` as a bar chart (largest at the top).

    Parameters
    ----------
    exp:
        Made with ``capture=("neurons",)``.
    k:
        How many neurons.
    row:
        Row of a batch.

    Returns
    -------
    matplotlib.figure.Figure
    """
    from lxt_plus.results.captures import top_neurons

    _get(exp, "neurons", row)
    top = top_neurons(exp, k=k, row=row, by="abs")[::-1]
    fig = _figure(6.0, max(2.5, 0.28 * len(top) + 1.2))
    ax = fig.add_subplot()
    values = [r for *_, r in top]
    ax.barh(range(len(top)), values, color=[colors.hex_color(0.85 if v > 0 else -0.85) for v in values])
    ax.set_yticks(range(len(top)), [f"layer {layer} · neuron {n}" for layer, n, _ in top], fontsize=8)
    ax.axvline(0.0, color="#57606a", linewidth=0.8)
    ax.set_xlabel("relevance (summed over tokens)")
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    ax.set_title(_title(exp, row, f"Top {len(top)} MLP neurons"), fontsize=10)
    return fig
