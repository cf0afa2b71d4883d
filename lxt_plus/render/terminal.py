"""ANSI-coloured heatmaps for the terminal, rendered with rich.

Each token sits on its own background colour from the shared scale with a text colour chosen for
contrast, so the output reads the same on dark and light terminals.
"""

from __future__ import annotations

import io
import shutil
from typing import TYPE_CHECKING, Any

import torch

from ..words import NEWLINE_SYMBOL, display_token
from ..words import normalize as _normalize
from . import colors
from ._common import header_fields, legend_labels, require, row_indices, row_items

if TYPE_CHECKING:
    from ..result import Explanation, GenerationExplanation

__all__ = ["explanation_terminal", "generation_terminal"]


def _console(width: int | None) -> Any:
    console_mod = require("rich.console", "terminal output")
    width = width or shutil.get_terminal_size((100, 24)).columns
    return console_mod.Console(
        file=io.StringIO(),
        force_terminal=True,
        color_system="truecolor",
        width=width,
        highlight=False,
        emoji=False,
        soft_wrap=False,
    )


def _style(value: float) -> Any:
    from rich.color import Color
    from rich.style import Style

    return Style(color=Color.from_rgb(*colors.text_rgb(value)), bgcolor=Color.from_rgb(*colors.rgb(value)))


def _legend(limit: float) -> Any:
    from rich.text import Text

    lo, _, hi = legend_labels(limit)
    text = Text().append(f"{lo} ", style="dim")
    for i in range(21):
        text.append(" ", style=_style(-1 + i / 10))
    return text.append(f" {hi}", style="dim")


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
) -> str:
    """The explanation as ANSI-coloured text.

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

    Returns
    -------
    str
        A header line per row (target, preset, logit, relevance sum), the coloured tokens and a legend.
    """
    from rich.text import Text

    console = _console(width)
    for r in row_indices(exp, row):
        console.print(_header(header_fields(exp, r)))
        line = Text()
        if exp.modality == "pixels":  # a coarse grid of cell averages, two characters per cell
            rel = _pool(exp.batch_relevance[r].detach().float().cpu(), console.width)
            for i, cells in enumerate(_normalize(rel, normalize).tolist()):
                line.append("\n" if i else "")
                for value in cells:
                    line.append("  ", style=_style(value))
        else:
            texts, rel = row_items(exp, r, words, hide_special)
            for text, value in zip(texts, _normalize(rel, normalize).tolist(), strict=True):
                line.append(text, style=_style(value))
                line.append("\n" if NEWLINE_SYMBOL in text else "")
        console.print(line)
        console.print(_legend(colors.color_limit(rel, normalize)))
    return console.file.getvalue()


def _pool(rel: torch.Tensor, width: int) -> torch.Tensor:
    """``(H, W)`` relevance averaged into cells two characters wide that fit ``width``."""
    h, w = rel.shape
    cols = max(1, min(w, (width - 1) // 2))
    rows = max(1, min(h, round(h * cols / w)))
    return torch.nn.functional.adaptive_avg_pool2d(rel[None, None], (rows, cols))[0, 0]


def generation_terminal(
    gen: GenerationExplanation, k: int = 5, normalize: str = "max", width: int | None = None
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

    Returns
    -------
    str
        One line per generated token: the token, then its top sources coloured by sign and size, each
        followed by its relevance.
    """
    from rich.text import Text

    console = _console(width)
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
                display_token(gen.tokens[i]).strip() or repr(gen.tokens[i]), style=_style(float(norm[i]))
            )
            line.append(f" {float(row[i]):+.3g}  ", style="dim")
        console.print(line)
    return console.file.getvalue()
