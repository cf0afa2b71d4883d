"""The code is formatted and linted as pyproject.toml says, and type-checks: CI runs these with the suite.

The tools come with the ``dev`` extra; without them these tests fail and say what to install.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PATHS = ["lxt_plus", "tests", "docs", "benchmarks", "dev"]


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, timeout=600
    )


def _need(module: str) -> None:
    if run(module, "--version").returncode != 0:
        pytest.fail(f"{module} is not installed: pip install -e '.[dev]'")


def test_ruff_format() -> None:
    _need("ruff")
    proc = run("ruff", "format", "--check", *PATHS)
    assert proc.returncode == 0, f"run `ruff format {' '.join(PATHS)}`:\n{proc.stdout}{proc.stderr}"


def test_ruff_check() -> None:
    _need("ruff")
    proc = run("ruff", "check", *PATHS)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.slow
def test_mypy(tmp_path: Path) -> None:
    _need("mypy")
    cache = tmp_path / "mypy-cache"
    proc = run("mypy", "--cache-dir", str(cache), "lxt_plus")
    shutil.rmtree(cache, ignore_errors=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
