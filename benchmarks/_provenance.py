"""What a benchmark report says about where it came from: the code version it ran."""

from __future__ import annotations

import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def code_version() -> str:
    """The checkout's short commit hash, with ``+changes`` when the working tree differs from it
    (``unknown`` outside a git checkout)."""

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True)

    head = run("rev-parse", "--short", "HEAD").stdout.strip()
    if not head:
        return "unknown"
    dirty = run("status", "--porcelain", "--untracked-files=no").stdout.strip()
    return f"{head}+changes" if dirty else head
