"""MkDocs hook: render the notebooks in ``notebooks/`` from where they are, without copying them.

MkDocs only collects pages under ``docs_dir``. This hook adds every ``notebooks/*.ipynb`` of the
repository to the site's files with its own folder as source, before mkdocs-jupyter turns
notebooks into pages, so the ``nav`` can name ``notebooks/<name>.ipynb``.
"""

from __future__ import annotations

from pathlib import Path

from mkdocs.config.defaults import MkDocsConfig
from mkdocs.plugins import event_priority
from mkdocs.structure.files import File, Files

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = ROOT / "notebooks"


@event_priority(100)  # before mkdocs-jupyter's on_files (default priority 0)
def on_files(files: Files, config: MkDocsConfig) -> Files:
    for path in sorted(NOTEBOOKS.glob("*.ipynb")):
        uri = path.relative_to(ROOT).as_posix()
        if files.get_file_from_path(uri) is None:
            files.append(File(uri, str(ROOT), config.site_dir, config.use_directory_urls))
    return files
