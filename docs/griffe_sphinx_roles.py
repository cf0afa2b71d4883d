"""Griffe extension for the API reference: Sphinx roles in docstrings become cross-references.

lxt_plus's numpy-style docstrings name other objects with Sphinx roles (``:class:`Preset```,
``:func:`~lxt_plus.engine.plan.list_presets```). mkdocstrings does not read roles, so this extension
rewrites each one, once the package is loaded, into an *optional* autorefs link: a link where the
target is rendered on the site, plain code where it is not (a private helper, ``json.dumps``).
Names are resolved in the scope of the object whose docstring holds them, as Sphinx does; a
leading ``~`` shows the last component only. Only the rendered text changes, not the sources.
"""

from __future__ import annotations

import re
from html import escape
from typing import Any

import griffe

ROLE = re.compile(
    r":(?:py:)?(?:class|func|meth|mod|data|attr|exc|obj|const):`(?P<tilde>~?)(?P<name>[^`<>]+)`"
)


def _resolve(obj: griffe.Object, name: str) -> str:
    """The full path of ``name`` as seen from ``obj``, or ``name`` itself when it does not resolve."""
    first, dot, rest = name.partition(".")
    try:
        path = obj.resolve(first)
    except (griffe.NameResolutionError, griffe.AliasResolutionError, griffe.CyclicAliasError):
        return name
    return f"{path}{dot}{rest}"


def _rewrite(obj: griffe.Object, text: str) -> str:
    def link(match: re.Match[str]) -> str:
        name = match["name"].strip()
        shown = name.rsplit(".", 1)[-1] if match["tilde"] else name
        target = _resolve(obj, name)
        return f'<autoref identifier="{escape(target)}" optional><code>{escape(shown)}</code></autoref>'

    return ROLE.sub(link, text)


def _walk(obj: griffe.Object) -> None:
    if obj.docstring is not None and ":" in obj.docstring.value:
        obj.docstring.value = _rewrite(obj, obj.docstring.value)
    for member in obj.members.values():
        if not member.is_alias:
            _walk(member)  # type: ignore[arg-type]


class SphinxRoles(griffe.Extension):
    """Rewrite Sphinx roles in every docstring of a loaded package."""

    def on_package(self, *, pkg: griffe.Module, loader: griffe.GriffeLoader, **kwargs: Any) -> None:
        _walk(pkg)
