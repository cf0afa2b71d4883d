"""The documentation site builds with ``mkdocs build --strict``: API reference, how-to pages, notebooks.

The tools come with the ``dev`` extra (mkdocs, mkdocs-material, mkdocstrings[python],
mkdocs-jupyter). Without them these tests fail and say what to install: the site is part of what
the suite checks, so it is not skipped.
"""

from __future__ import annotations

import html
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import lxt_plus

ROOT = Path(__file__).resolve().parents[2]
TOOLS = {
    "mkdocs": "mkdocs",
    "material": "mkdocs-material",
    "mkdocstrings": "mkdocstrings",
    "mkdocstrings_handlers.python": "mkdocstrings-python",
    "mkdocs_jupyter": "mkdocs-jupyter",
}
# material prints a banner about MkDocs 2.0; bytecode of docs/hooks.py stays out of the tree
ENV = {**os.environ, "NO_MKDOCS_2_WARNING": "1", "PYTHONDONTWRITEBYTECODE": "1"}


def mkdocs_build(*args: str) -> subprocess.CompletedProcess[str]:
    missing = [pip for module, pip in TOOLS.items() if importlib.util.find_spec(module) is None]
    if missing:
        pytest.fail(
            f"the documentation tools are not installed ({', '.join(missing)}): "
            "pip install -e '.[dev]' (or pip install mkdocs mkdocs-material 'mkdocstrings[python]' mkdocs-jupyter)"
        )
    return subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", *args],
        cwd=ROOT,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )


def text_of(page: str) -> str:
    """The visible text of an HTML page, whitespace collapsed."""
    return " ".join(html.unescape(re.sub(r"<[^>]+>", " ", page)).split())


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("site")
    proc = mkdocs_build("--strict", "--site-dir", str(out))
    assert proc.returncode == 0, f"mkdocs build --strict failed:\n{proc.stderr[-6000:]}"
    return out


def test_every_page_is_built(site: Path) -> None:
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text())
    pages: list[str] = []

    def walk(nav: object) -> None:
        if isinstance(nav, str):
            pages.append(nav)
        elif isinstance(nav, list):
            for item in nav:
                walk(item)
        elif isinstance(nav, dict):
            for item in nav.values():
                walk(item)

    walk(config["nav"])
    assert any(p.startswith("howto/") for p in pages) and any(p.startswith("api/") for p in pages)
    for page in pages:
        stem = page.rsplit(".", 1)[0]
        built = site / ("index.html" if stem == "index" else f"{stem.removesuffix('/index')}/index.html")
        assert built.is_file(), f"{page} was not built"


def test_api_reference_shows_the_public_names_and_signatures(site: Path) -> None:
    page = (site / "api" / "index.html").read_text()
    anchors = set(re.findall(r'id="(lxt_plus\.[\w.]+)"', page))
    public = [name for name in lxt_plus.__all__ if name != "__version__"]
    undocumented = [
        n for n in public if not any(a == f"lxt_plus.{n}" or a.endswith(f".{n}") for a in anchors)
    ]
    assert not undocumented, f"lxt_plus.__all__ names missing from the API reference: {undocumented}"
    text = text_of(page)
    assert re.search(r"explain\s*\(\s*model\s*:\s*Module\s*,\s*inputs\s*:", text), "no explain signature"
    assert re.search(r"checkpointing\s*:\s*bool\s*=\s*False", text)
    assert "Explain a prediction with LRP in one forward and one backward pass." in text
    for page, module in (
        ("rules", "engine.rules"),
        ("functional", "engine.functional"),
        ("capture", "api.capture"),
        ("render", "render"),
        ("errors", "errors"),
    ):
        assert f'id="lxt_plus.{module}"' in (site / "api" / page / "index.html").read_text()


def test_sphinx_roles_in_docstrings_become_links(site: Path) -> None:
    rules = (site / "api" / "rules" / "index.html").read_text()
    # register_rule's docstring says :class:`Rule` and :class:`~lxt_plus.errors.ConfigError`
    assert re.search(r'href="#lxt_plus\.engine\.rules\.Rule"[^>]*>\s*<code>Rule</code>', rules)
    assert re.search(
        r'href="\.\./errors/#lxt_plus\.errors\.ConfigError"[^>]*>\s*<code>ConfigError</code>', rules
    )
    for page in (site / "api").rglob("*.html"):
        assert not re.search(r":(class|func|mod|data|attr|meth|exc):", text_of(page.read_text())), page


def test_notebooks_are_rendered_from_their_folder(site: Path) -> None:
    notebooks = sorted((ROOT / "notebooks").glob("*.ipynb"))
    assert notebooks
    for nb in notebooks:
        page = (site / "notebooks" / nb.stem / "index.html").read_text()
        assert "jupyter-wrapper" in page and "import lxt_plus" in text_of(page), nb.name
        # executed for the site: the notebook's own closing check printed its line
        assert f"notebook {nb.name[:2]} ok" in text_of(page), f"{nb.name} is shown without its outputs"
    assert not (ROOT / "docs" / "notebooks").exists(), "notebooks are read in place, not copied into docs/"


def test_strict_mode_is_on_in_the_config(tmp_path: Path) -> None:
    """A copy of mkdocs.yml with one broken cross-reference fails to build, without --strict."""
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text())
    assert config["strict"] is True
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "index.md").write_text("# Broken\n\nSee [explain][lxt_plus.no_such_function].\n")
    for key in ("nav", "hooks"):  # the copy has one page and no notebooks
        config.pop(key, None)
    config.update(docs_dir=str(docs), site_dir=str(tmp_path / "site"))
    copy = tmp_path / "mkdocs.yml"
    copy.write_text(yaml.safe_dump(config, sort_keys=False))
    proc = mkdocs_build("--config-file", str(copy))
    assert proc.returncode != 0, "a broken cross-reference must fail the build"
    assert "Could not find cross-reference target 'lxt_plus.no_such_function'" in proc.stderr, proc.stderr
    config["strict"] = False  # the control: the same copy builds, only warning, when strict is off
    copy.write_text(yaml.safe_dump(config, sort_keys=False))
    proc = mkdocs_build("--config-file", str(copy))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "lxt_plus.no_such_function" in proc.stderr
