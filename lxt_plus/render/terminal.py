"""ANSI-coloured heatmaps for the terminal, rendered with rich.

Each token sits on its own background colour from the shared scale with a text colour chosen for
contrast, so the output reads the same on dark and light terminals. Without colour (``color=False``,
or ``NO_COLOR`` set) the text holds no escape codes at all and each token is followed by its
signed, normalised relevance, ``[+0.83]``.
"""

from __future__ import annotations

import io
import shutil
from typing import TYPE_CHECKING, Any

import torch

from lxt_plus.render import COLOR_MODES, colors, use_color
from lxt_plus.render._common import (
    header_fields,
    legend_labels,
    require,
    row_indices,
    row_items,
    row_positions,
)
from lxt_plus.render.summary import generation_summary, segments_summary, summary_line
from lxt_plus.results.words import NEWLINE_SYMBOL, display_token
from lxt_plus.results.words import normalize as _normalize

if TYPE_CHECKING:
    from lxt_plus.results.result import Explanation, GenerationExplanation
    from lxt_plus.results.segments import Segments

__all__ = ["COLOR_MODES", "explanation_terminal", "generation_terminal", "segments_terminal", "use_color"]


def _console(width: int | None, color: bool) -> Any:
    console_mod = require("rich.console", "terminal output")
    width = width or shutil.get_terminal_size((100, 24)).columns
    return console_mod.Console(
        file=io.StringIO(),
        force_terminal=color,
        color_system="truecolor" if color else None,  # None: no escape codes at all, bold and dim too
        no_color=not color,
        width=width,
        highlight=False,
        emoji=False,
        soft_wrap=False,
    )


def _style(value: float) -> Any:
    from rich.color import Color
    from rich.style import Style

    return Style(color=Color.from_rgb(*colors.text_rgb(value)), bgcolor=Color.from_rgb(*colors.rgb(value)))


def _legend(limit: float, color: bool = True, normalize: str = "max") -> Any:
    from rich.text import Text

    if not color:
        scale = {"max": "the largest |relevance|", "sum": "the sum of |relevance|"}.get(normalize)
        if scale is None:
            return Text("[+/-v]: relevance, not normalised")
        return Text(f"[+/-v]: relevance / {limit:.4g} ({scale})")
    lo, _, hi = legend_labels(limit)
    text = Text().append(f"{lo} ", style="dim")
    for i in range(21):
        text.append(" ", style=_style(-1 + i / 10))
    return text.append(f" {hi}", style="dim")


_CELLS = ((0.5, "##"), (0.15, "++"), (-0.15, ".."), (-0.5, "--"))


def _cell(value: float) -> str:
    """Two characters for a pixel cell without colour: ``##`` ``++`` ``..`` ``--`` ``==`` from + to -."""
    for bound, mark in _CELLS:
        if value >= bound:
            return mark
    return "=="


def _header(fields: list[tuple[str, str]]) -> Any:
    from rich.text import Text

    text = Text()
    for i, (name, value) in enumerate(fields):
        text.append(" | " if i else "", style="dim").append(f"{name} ", style="dim").append(
            value, style="bold"
        )
    return text


def explanation_terminal(
    exp: Explanation,
    row: int | None = None,
    normalize: str = "max",
    words: bool = False,
    width: int | None = None,
    hide_special: bool = False,
    color: bool | None = None,
) -> str:
    """The explanation as ANSI-coloured text, or as plain text with a value after each token.

    Parameters
    ----------
    exp:
        The explanation.
    row:
        Row of a batch to show; ``None`` shows every row.
    normalize:
        ``"max"``, ``"sum"`` or ``"none"``, applied per row.
    words:
        Merge sub-word tokens into words first.
    width:
        Line width in characters; defaults to the terminal's width.
    hide_special:
        Leave out special and chat-template tokens (``exp.hidden``).
    color:
        ``True`` for ANSI colours, ``False`` for plain text (no escape codes; each token followed
        by its signed normalised relevance, pixels as ``##``/``++``/``..``/``--``/``==`` cells);
        ``None``: colour unless ``NO_COLOR`` is set (see :func:`use_color`).

    Returns
    -------
    str
        A header line per row (target, preset, logit, relevance sum), the tokens and a legend.
    """
    from rich.text import Text

    color = use_color() if color is None else color
    console = _console(width, color)
    for r in row_indices(exp, row):
        console.print(_header(header_fields(exp, r)))
        line = Text()
        if exp.modality == "pixels":  # a coarse grid of cell averages, two characters per cell
            rel = _pool(exp.batch_relevance[r].detach().float().cpu(), console.width)
            for i, cells in enumerate(_normalize(rel, normalize).tolist()):
                line.append("\n" if i else "")
                for value in cells:
                    line.append("  " if color else _cell(value), style=_style(value) if color else None)
        else:
            texts, rel = row_items(exp, r, words, hide_special)
            for text, value in zip(texts, _normalize(rel, normalize).tolist(), strict=True):
                if color:
                    line.append(text, style=_style(value))
                else:
                    line.append(f"{text}[{value:+.2f}]")
                line.append("\n" if NEWLINE_SYMBOL in text else "")
        console.print(line)
        positions = row_positions(exp, r, rel, normalize, words, hide_special)
        if positions is not None:
            cells = Text("positions: ")
            for i, value in enumerate(positions[1].tolist()):
                cells.append(
                    f" {i} " if color else f"{i}[{value:+.2f}] ", style=_style(value) if color else None
                )
            console.print(cells)
        if exp.modality == "pixels" and not color:
            console.print(
                Text("cells: ## >= +0.5, ++ >= +0.15, .. near 0, -- <= -0.15, == <= -0.5 (normalised)")
            )
        else:
            console.print(_legend(colors.color_limit(rel, normalize), color, normalize))
        console.print(Text(summary_line(exp, r, colored=color, hide_special=hide_special)))
    return console.file.getvalue()


def _pool(rel: torch.Tensor, width: int) -> torch.Tensor:
    """``(H, W)`` relevance averaged into cells two characters wide that fit ``width``."""
    h, w = rel.shape
    cols = max(1, min(w, (width - 1) // 2))
    rows = max(1, min(h, round(h * cols / w)))
    return torch.nn.functional.adaptive_avg_pool2d(rel[None, None], (rows, cols))[0, 0]


def generation_terminal(
    gen: GenerationExplanation,
    k: int = 5,
    normalize: str = "max",
    width: int | None = None,
    color: bool | None = None,
) -> str:
    """For each generated token, the ``k`` earlier tokens with the largest ``|relevance|``.

    Parameters
    ----------
    gen:
        The generation explanation.
    k:
        Source tokens per line.
    normalize:
        ``"max"``, ``"sum"`` or ``"none"``, applied to each row of the matrix (colours only).
    width:
        Line width in characters; defaults to the terminal's width.
    color:
        ``True`` for ANSI colours, ``False`` for plain text without escape codes; ``None``: colour
        unless ``NO_COLOR`` is set (see :func:`use_color`).

    Returns
    -------
    str
        Two lines per generated token: the token, then its top sources coloured by sign and size, each
        followed by its relevance; then, indented, the sentence of
        :func:`~lxt_plus.render.summary.generation_summary` (what pushed it up and down).
    """
    from rich.text import Text

    color = use_color() if color is None else color
    console = _console(width, color)
    console.print(
        _header(
            [
                ("preset", gen.rules),
                ("prompt tokens", str(gen.prompt_length)),
                ("generated", str(len(gen.generated_tokens))),
            ]
        )
    )
    matrix = gen.matrix.detach().float().cpu()
    for t, row in enumerate(matrix):
        norm = _normalize(row, normalize)
        line = Text().append(repr(display_token(gen.tokens[gen.prompt_length + t])), style="bold")
        line.append(" <- ", style="dim")
        before = row[: gen.prompt_length + t]
        for i in torch.argsort(before.abs(), descending=True)[:k].tolist():
            line.append(
                display_token(gen.tokens[i]).strip() or repr(gen.tokens[i]),
                style=_style(float(norm[i])) if color else None,
            )
            line.append(f" {float(row[i]):+.3g}  ", style="dim")
        console.print(line)
        console.print(Text("    " + generation_summary(gen, t, colored=color), style="dim"))
    return console.file.getvalue()


def segments_terminal(segs: Segments, width: int | None = None, color: bool | None = None) -> str:
    """One line per segment: signed relevance, share of the total, and the start of its text, the
    value cell coloured on the token scale (plain text with ``color=False``)."""
    from rich.text import Text

    color = use_color() if color is None else color
    console = _console(width, color)
    console.print(_header([("segments by", segs.by), ("count", str(len(segs)))]))
    values = segs.relevance
    norm = _normalize(values, "max").tolist() if len(values) else []
    for seg, n in zip(segs, norm, strict=True):
        cell = f" {seg.relevance:+9.3g} {seg.share:+6.0%} "
        label = f"{seg.name}: " if seg.name else ""
        room = max(10, console.width - len(cell) - 2)
        text = (label + seg.text).replace("\n", " ")
        text = text if len(text) <= room else text[: room - 3] + "..."
        console.print(Text().append(cell, style=_style(n) if color else None).append(" " + text))
    console.print(Text(segments_summary(segs, colored=color)))
    return console.file.getvalue()
