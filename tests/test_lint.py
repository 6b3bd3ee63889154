"""The code stays lint-clean (ruff) and type-checked (mypy on the package), as CI runs only pytest."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def _run(repo: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", *args], cwd=repo, capture_output=True, text=True)


def test_ruff(repo: Path) -> None:
    proc = _run(repo, "ruff", "check", ".")
    assert proc.returncode == 0, proc.stdout[-4000:]


def test_mypy(repo: Path) -> None:
    proc = _run(repo, "mypy")
    assert proc.returncode == 0, proc.stdout[-4000:]
