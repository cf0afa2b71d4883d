"""Renderers for explanations: HTML, terminal, matplotlib, LaTeX, and saving by file suffix.

Every renderer uses the diverging colour scale of :mod:`lxt_plus.render.colors`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lxt_plus.errors import InputError

if TYPE_CHECKING:
    from lxt_plus.results.result import Explanation, GenerationExplanation

__all__ = [
    "COLOR_MODES",
    "EXPLANATION_FORMATS",
    "GENERATION_FORMATS",
    "IMAGE_FORMATS",
    "save_explanation",
    "save_generation",
    "use_color",
]

# The one list of file formats: ``save`` picks the format by suffix, and the command line derives
# its ``--format`` choices from these names (plus "terminal").
IMAGE_FORMATS = ("png", "pdf", "svg")  # matplotlib figures (binary: they need a file)
EXPLANATION_FORMATS = (*IMAGE_FORMATS, "html", "json", "tex")
GENERATION_FORMATS = (*IMAGE_FORMATS, "html", "json")
EXPLANATION_SUFFIXES = tuple(f".{f}" for f in EXPLANATION_FORMATS)
GENERATION_SUFFIXES = tuple(f".{f}" for f in GENERATION_FORMATS)
_IMAGE = tuple(f".{f}" for f in IMAGE_FORMATS)

COLOR_MODES = ("auto", "always", "never")


def use_color(mode: str = "auto", tty: bool | None = None) -> bool:
    """Whether to write ANSI colour, by the usual conventions.

    ``"always"`` and ``"never"`` decide alone. ``"auto"``: no colour when ``NO_COLOR`` is set to
    anything non-empty (https://no-color.org); colour when ``FORCE_COLOR`` is (``NO_COLOR`` wins
    when both are); else colour only when the output is a terminal (``tty``; ``None``, for a string
    whose destination is unknown, counts as a terminal).
    """
    if mode not in COLOR_MODES:
        raise InputError(f"unknown colour mode {mode!r}; expected one of {', '.join(COLOR_MODES)}")
    if mode != "auto":
        return mode == "always"
    if os.environ.get("NO_COLOR"):
        return False
    if os.environ.get("FORCE_COLOR"):
        return True
    return True if tty is None else bool(tty)


def _suffix(path: str | os.PathLike[str], valid: tuple[str, ...], what: str) -> str:
    suffix = Path(path).suffix.lower()
    if suffix not in valid:
        raise InputError(
            f"cannot save {what} as {str(path)!r}: unknown suffix {suffix or '(none)'!r}; "
            f"use one of {', '.join(valid)}"
        )
    return suffix


def html_page(fragment: str, title: str) -> str:
    from html import escape

    return (
        f'<!DOCTYPE html>\n<html><head><meta charset="utf-8"><title>{escape(title)}</title></head>\n'
        f"<body>{fragment}</body></html>\n"
    )


def _save_figure(fig: Any, path: str | os.PathLike[str], dpi: int) -> None:
    fig.savefig(path, dpi=dpi, bbox_inches="tight", facecolor="white")


def save_explanation(exp: Explanation, path: str | os.PathLike[str], dpi: int = 150, **kw: Any) -> None:
    """Save an explanation, the format chosen by the suffix of ``path``.

    Parameters
    ----------
    exp:
        The explanation.
    path:
        Ends in ``.png``/``.pdf``/``.svg`` (matplotlib figure), ``.html`` (a page around
        :func:`~lxt_plus.render.html.explanation_html`), ``.json`` (:func:`~lxt_plus.results.serialize.explanation_to_dict`)
        or ``.tex`` (:func:`~lxt_plus.render.latex.explanation_latex`).
    dpi:
        Resolution of ``.png`` files.
    **kw:
        Passed on to the renderer (``row``, ``normalize``, ``words``), or to :func:`json.dumps` for ``.json``.

    Raises
    ------
    InputError
        For any other suffix.
    """
    suffix = _suffix(path, EXPLANATION_SUFFIXES, "an explanation")
    if suffix in _IMAGE:
        from lxt_plus.render.mpl import plot_explanation

        _save_figure(plot_explanation(exp, **kw), path, dpi)
        return
    if suffix == ".html":
        from lxt_plus.render.html import explanation_html

        text = html_page(explanation_html(exp, **kw), f"lxt_plus: {exp.targets[0].describe()}")
    elif suffix == ".json":
        from lxt_plus.results.serialize import explanation_to_dict

        text = json.dumps(explanation_to_dict(exp), **kw)
    else:
        from lxt_plus.render.latex import explanation_latex

        text = explanation_latex(exp, **kw)
    Path(path).write_text(text, encoding="utf-8")


def save_generation(
    gen: GenerationExplanation, path: str | os.PathLike[str], dpi: int = 150, **kw: Any
) -> None:
    """Save a generation explanation as ``.png``/``.pdf``/``.svg``, ``.html`` (interactive) or ``.json``.

    ``**kw`` goes to the renderer (:func:`~lxt_plus.render.mpl.plot_generation`,
    :func:`~lxt_plus.render.html.generation_html`) or to :func:`json.dumps`.

    Raises
    ------
    InputError
        For any other suffix.
    """
    suffix = _suffix(path, GENERATION_SUFFIXES, "a generation explanation")
    if suffix in _IMAGE:
        from lxt_plus.render.mpl import plot_generation

        _save_figure(plot_generation(gen, **kw), path, dpi)
        return
    if suffix == ".html":
        from lxt_plus.render.html import generation_html

        text = html_page(generation_html(gen, **kw), "lxt_plus: generation")
    else:
        from lxt_plus.results.serialize import generation_to_dict

        text = json.dumps(generation_to_dict(gen), **kw)
    Path(path).write_text(text, encoding="utf-8")
