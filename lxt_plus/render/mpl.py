"""Matplotlib figures: token heatmaps, pixel heatmaps, feature bars and the generation matrix.

Figures are built with :class:`matplotlib.figure.Figure` directly (no pyplot state), so they work on any
backend, headless included.
"""

from __future__ import annotations

import textwrap
from typing import TYPE_CHECKING, cast

import torch

from lxt_plus.errors import InputError
from lxt_plus.render import colors
from lxt_plus.render._common import (
    header_fields,
    legend_labels,
    patch_overlay,
    require,
    row_indices,
    row_items,
    row_positions,
)
from lxt_plus.render.summary import summary_line
from lxt_plus.results.words import NEWLINE_SYMBOL, display_token
from lxt_plus.results.words import normalize as _normalize

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

    from lxt_plus.results.result import Explanation, GenerationExplanation

__all__ = ["plot_explanation", "plot_generation"]

FONT_SIZE = 10.0
CHAR_W = 0.602 * FONT_SIZE / 72  # inches per monospace character
LINE_H = 2.0 * FONT_SIZE / 72  # inches per text line
WRAP = 80  # characters per line of a new figure
LEGEND_W = 30  # characters


def _figure(size: tuple[float, float]) -> Figure:
    require("matplotlib", "plotting")
    from matplotlib.figure import Figure

    return Figure(figsize=size, layout="constrained")


def _title(exp: Explanation, r: int) -> str:
    return "   ".join(f"{name}: {value}" for name, value in header_fields(exp, r))


def _layout(texts: list[str], wrap: int) -> tuple[list[tuple[float, int, float, str]], int]:
    """Place token boxes on lines: (x, line, width, label) each, and the number of lines."""
    boxes, x, line = [], 0.0, 0
    for text in texts:
        label = text.strip() or "\u2423"  # ␣ for whitespace tokens
        w = len(label) + 0.6
        if x > 0 and x + w > wrap:
            x, line = 0.0, line + 1
        boxes.append((x, line, w, label))
        x += w + 0.35
        if NEWLINE_SYMBOL in text:
            x, line = 0.0, line + 1
    return boxes, line + 1 if boxes else 1


def _draw_tokens(
    ax: Axes,
    texts: list[str],
    rel: torch.Tensor,
    normalize: str,
    wrap: int,
    positions: torch.Tensor | None = None,
) -> None:
    """Token boxes, and under each one a bar in the same colour scale for the relevance of its
    position (``positions``: values in ``[-1, 1]`` from :func:`row_positions`; PA-LRP)."""
    from matplotlib.patches import FancyBboxPatch, Rectangle

    boxes, lines = _layout(texts, wrap)
    if positions is not None:
        for (x, line, w, _), v in zip(boxes, positions.tolist(), strict=True):
            ax.add_patch(
                Rectangle(
                    (x + 0.1, -line - 0.97),
                    w - 0.2,
                    0.12,
                    facecolor=colors.hex_color(v),
                    edgecolor="#d0d7de",
                    linewidth=0.3,
                    gid="lxt-position",
                )
            )
    for (x, line, w, label), v in zip(boxes, _normalize(rel, normalize).tolist(), strict=True):
        ax.add_patch(
            FancyBboxPatch(
                (x, -line - 0.8),
                w,
                0.6,
                boxstyle="round,pad=0,rounding_size=0.12",
                facecolor=colors.hex_color(v),
                edgecolor="#d0d7de",
                linewidth=0.4,
            )
        )
        ax.text(
            x + w / 2,
            -line - 0.5,
            label,
            ha="center",
            va="center",
            family="monospace",
            fontsize=FONT_SIZE,
            color=colors.text_color(v),
        )
    # legend: gradient bar with -limit / 0 / +limit labels on a line of its own
    y = -lines - 0.4
    x0 = max(0.0, (wrap - LEGEND_W) / 2)
    ax.imshow(
        torch.linspace(-1, 1, 256)[None].numpy(),
        cmap=colors.colormap(),
        vmin=-1,
        vmax=1,
        extent=(x0, x0 + LEGEND_W, y - 0.35, y),
        aspect="auto",
        interpolation="bilinear",
    )
    for xpos, label, ha in zip(
        (x0, x0 + LEGEND_W / 2, x0 + LEGEND_W),
        legend_labels(colors.color_limit(rel, normalize)),
        ("left", "center", "right"),
        strict=True,
    ):
        ax.text(xpos, y - 0.5, label, ha=ha, va="top", fontsize=FONT_SIZE * 0.8, color="#57606a")
    if positions is not None:
        ax.text(
            x0 + LEGEND_W + 1.0,
            y - 0.18,
            "bars under the tokens: their positions",
            ha="left",
            va="center",
            fontsize=FONT_SIZE * 0.75,
            color="#57606a",
        )
    ax.set_xlim(-0.3, wrap + 0.3)
    ax.set_ylim(-lines - 1.5, 0.0)
    ax.set_axis_off()


def _axis_label(normalize: str) -> str:
    return "relevance" + ("" if normalize == "none" else f" (normalised: {normalize})")


def _draw_pixels(
    fig: Figure, ax: Axes, rel: torch.Tensor, normalize: str, image: torch.Tensor | None = None
) -> None:
    """The pixel heatmap in the token scale's colours; over the image itself when it is given."""
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    img = _normalize(rel, normalize)
    lim = float(img.abs().max()) or 1.0
    if image is not None and image.shape[-2:] == rel.shape and image.shape[0] in (1, 3):
        ax.imshow(colors.overlay(image, img, lim).numpy(), interpolation="nearest")
    else:
        ax.imshow(img.numpy(), cmap=colors.colormap(), vmin=-lim, vmax=lim, interpolation="nearest")
    ax.set_axis_off()
    scale = ScalarMappable(Normalize(-lim, lim), colors.colormap())
    fig.colorbar(scale, ax=ax, fraction=0.046, pad=0.04, label=_axis_label(normalize))


def _draw_features(ax: Axes, names: list[str], rel: torch.Tensor, normalize: str) -> None:
    vals = _normalize(rel, normalize)
    shade = _normalize(rel, "max")
    ax.barh(
        range(len(names)),
        vals.tolist(),
        color=[colors.hex_color(v) for v in shade.tolist()],
        edgecolor="#57606a",
        linewidth=0.5,
    )
    ax.axvline(0, color="#1f2328", linewidth=0.8)
    ax.set_yticks(range(len(names)), [n.strip() for n in names])
    ax.invert_yaxis()
    ax.set_xlabel(_axis_label(normalize))


def _draw_row_images(ax: Axes, exp: Explanation, r: int, normalize: str) -> None:
    """A vision-language row's images, right of its tokens: each overlaid with its pixel relevance
    (pooled to the model's patches where it has them) on its own colour scale, titled by its total."""
    if exp.images is None:
        return
    images = exp.images.of_row(r)
    for i in range(len(images.channels)):
        inset = ax.inset_axes((1.02 + 0.27 * i, 0.0, 0.25, 1.0))
        inset.imshow(
            patch_overlay(images.pixels[i], images.relevance[i], images.patch_size, normalize).numpy()
        )
        inset.set_axis_off()
        inset.set_title(f"image {float(images.relevance[i].sum()):+.3g}", fontsize=FONT_SIZE * 0.7)


def plot_explanation(
    exp: Explanation,
    row: int | None = None,
    normalize: str = "max",
    words: bool = False,
    ax: Axes | None = None,
    hide_special: bool = False,
    overlay: bool = True,
) -> Figure:
    """Plot an explanation.

    Tokens are drawn as coloured boxes wrapped over lines with a colour legend; pixel relevance
    (``(H, W)`` per row) over the input image, tinted in the token colour scale, with a colour bar; features as a
    horizontal signed bar chart.

    Parameters
    ----------
    exp:
        The explanation.
    row:
        Row of a batch to plot; ``None`` plots every row (one axes each).
    normalize:
        ``"max"``, ``"sum"`` or ``"none"``, applied per row.
    words:
        Merge sub-word tokens into words first (tokens only).
    ax:
        Axes to draw into (one row only); a new figure is made when ``None``.
    hide_special:
        Leave out special and chat-template tokens (``exp.hidden``).
    overlay:
        Pixels: tint the input image with the heatmap (``False``: the heatmap alone).

    Returns
    -------
    matplotlib.figure.Figure
    """
    rows = row_indices(exp, row)
    if ax is not None and len(rows) > 1:
        raise InputError(f"ax= takes one row but the explanation has {len(rows)}; pass row= as well")
    items = [
        row_items(exp, r, words, hide_special) if exp.modality != "pixels" else ([], torch.empty(0))
        for r in rows
    ]
    if ax is not None:
        fig = cast("Figure", ax.figure)
        axes = [ax]
        wrap = max(10, int(ax.bbox.width / fig.dpi / CHAR_W))
    else:
        wrap = WRAP
        if exp.modality == "tokens":
            heights = [(_layout(texts, wrap)[1] + 2.7) * LINE_H for texts, _ in items]
            fig = _figure(((wrap + 1) * CHAR_W + 0.3, sum(heights)))
            axes = list(
                fig.subplots(len(rows), 1, squeeze=False, gridspec_kw={"height_ratios": heights})[:, 0]
            )
        elif exp.modality == "pixels":
            fig = _figure((4.2 * len(rows), 3.8))
            axes = list(fig.subplots(1, len(rows), squeeze=False)[0])
        else:
            n = max(len(texts) for texts, _ in items)
            fig = _figure((6.0, (0.3 * n + 1.2) * len(rows)))
            axes = list(fig.subplots(len(rows), 1, squeeze=False)[:, 0])
    for a, r, (texts, rel) in zip(axes, rows, items, strict=True):
        if exp.modality == "tokens":
            found = row_positions(exp, r, rel, normalize, words, hide_special)
            _draw_tokens(a, texts, rel, normalize, wrap, None if found is None else found[1])
            _draw_row_images(a, exp, r, normalize)
        elif exp.modality == "pixels":
            image = exp.images.pixels[r] if overlay and exp.images is not None else None
            _draw_pixels(fig, a, exp.batch_relevance[r].detach().float().cpu(), normalize, image)
        else:
            _draw_features(a, texts, rel, normalize)
        a.set_title(_title(exp, r), fontsize=FONT_SIZE * 0.85, loc="left", color="#1f2328")
        summary = "\n".join(
            textwrap.wrap(
                summary_line(exp, r, hide_special=hide_special), 110 if exp.modality == "tokens" else 60
            )
        )
        a.text(
            0.0, -0.02, summary, transform=a.transAxes, va="top", fontsize=FONT_SIZE * 0.7, color="#57606a"
        )
    return fig


def plot_generation(gen: GenerationExplanation, ax: Axes | None = None, normalize: str = "none") -> Figure:
    """The generation matrix as an image.

    Rows are generated tokens, columns all tokens (prompt, then generated, split by a dashed line);
    symmetric ``bwr`` colour scale with a colour bar.

    Parameters
    ----------
    gen:
        The generation explanation.
    ax:
        Axes to draw into; a new figure is made when ``None``.
    normalize:
        ``"none"`` (raw relevance), or ``"max"``/``"sum"`` applied to each row.

    Returns
    -------
    matplotlib.figure.Figure
    """
    matrix = gen.matrix.detach().float().cpu()
    if normalize != "none":
        matrix = torch.stack([_normalize(m, normalize) for m in matrix]) if len(matrix) else matrix
    n_gen, n_all = matrix.shape
    if ax is None:
        fig = _figure((max(4.0, 0.24 * n_all + 2.0), max(2.5, 0.24 * n_gen + 1.8)))
        ax = fig.subplots()
    else:
        fig = cast("Figure", ax.figure)
    lim = float(matrix.abs().max()) if matrix.numel() else 0.0
    im = ax.imshow(
        matrix.numpy(),
        cmap="bwr",
        vmin=-(lim or 1.0),
        vmax=lim or 1.0,
        aspect="auto",
        interpolation="nearest",
    )

    def short(tok: str) -> str:
        text = display_token(tok).strip() or "\u2423"
        return text if len(text) <= 12 else text[:11] + "\u2026"

    ax.set_xticks(range(n_all), [short(t) for t in gen.tokens], rotation=90, fontsize=8)
    ax.set_yticks(range(n_gen), [short(t) for t in gen.generated_tokens], fontsize=8)
    ax.axvline(gen.prompt_length - 0.5, color="#1f2328", linestyle="--", linewidth=0.8)
    ax.set_xlabel("source token")
    ax.set_ylabel("generated token")
    ax.set_title(f"preset: {gen.rules}", fontsize=9, loc="left")
    fig.colorbar(im, ax=ax, label=_axis_label(normalize))
    return fig
