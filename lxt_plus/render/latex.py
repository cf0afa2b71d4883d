"""A LaTeX heatmap: one xcolor ``\\colorbox`` per token, ready to ``\\input`` into a paper."""

from __future__ import annotations

from typing import TYPE_CHECKING

from lxt_plus.errors import InputError
from lxt_plus.render import colors
from lxt_plus.render._common import header_fields, row_indices, row_items
from lxt_plus.render.summary import summary_line
from lxt_plus.results.words import NEWLINE_SYMBOL
from lxt_plus.results.words import normalize as _normalize

if TYPE_CHECKING:
    from lxt_plus.results.result import Explanation

__all__ = ["explanation_latex", "escape_latex"]

_ESCAPES = {
    "\\": r"\textbackslash{}",
    "&": r"\&",
    "%": r"\%",
    "$": r"\$",
    "#": r"\#",
    "_": r"\_",
    "{": r"\{",
    "}": r"\}",
    "~": r"\textasciitilde{}",
    "^": r"\textasciicircum{}",
    "<": r"\textless{}",
    ">": r"\textgreater{}",
    "|": r"\textbar{}",
    NEWLINE_SYMBOL: r"$\hookleftarrow$",
}


def escape_latex(text: str) -> str:
    r"""Escape the LaTeX special characters ``\ & % $ # _ { } ~ ^`` (and ``< > | ↵``) in ``text``.

    Examples
    --------
    >>> print(escape_latex("50% of $x_1"))
    50\% of \$x\_1
    """
    return "".join(_ESCAPES.get(ch, ch) for ch in text)


def _box(text: str, value: float) -> str:
    r, g, b = colors.rgb(value)
    body = escape_latex(text.strip()) or r"\textvisiblespace{}"
    if colors.text_rgb(value) == colors.LIGHT_TEXT:
        body = rf"\textcolor{{white}}{{{body}}}"
    box = rf"\colorbox[RGB]{{{r},{g},{b}}}{{\strut {body}}}"
    return box + (r"\newline" if NEWLINE_SYMBOL in text else "")


def explanation_latex(
    exp: Explanation,
    row: int | None = None,
    normalize: str = "max",
    words: bool = False,
    hide_special: bool = False,
) -> str:
    r"""The explanation as a ``.tex`` snippet.

    Each token becomes ``\colorbox[RGB]{r,g,b}{\strut token}`` with the shared colour scale and escaped
    text; a comment header records the target and notes the ``\usepackage{xcolor}`` requirement.

    Parameters
    ----------
    exp:
        The explanation (tokens or features; pixels have no text form).
    row:
        Row of a batch; ``None`` writes every row as its own paragraph.
    normalize:
        ``"max"``, ``"sum"`` or ``"none"``, applied per row.
    words:
        Merge sub-word tokens into words first.
    hide_special:
        Leave out special and chat-template tokens (``exp.hidden``).

    Returns
    -------
    str
    """
    if exp.modality == "pixels":
        raise InputError("pixel relevance has no LaTeX text form; save it as .png, .pdf or .svg instead")
    lines = ["% lxt_plus relevance heatmap; needs \\usepackage{xcolor} in the preamble"]
    for r in row_indices(exp, row):
        fields = ", ".join(f"{k}: {v}" for k, v in header_fields(exp, r))
        lines.append("% " + " ".join(fields.split()))
        texts, rel = row_items(exp, r, words, hide_special)
        boxes = [_box(t, v) for t, v in zip(texts, _normalize(rel, normalize).tolist(), strict=True)]
        lines.append("{\\setlength{\\fboxsep}{1pt}%\n" + "\\allowbreak\n".join(boxes) + "%\n}\\par")
        lines.append(escape_latex(summary_line(exp, r, hide_special=hide_special)) + "\\par")
    return "\n".join(lines) + "\n"
