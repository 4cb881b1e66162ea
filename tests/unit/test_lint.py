"""Type-checking and lint are tests: a type error or lint finding fails the suite."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[2]


def test_mypy_strict() -> None:
    out = subprocess.run([sys.executable, "-m", "mypy", "--strict", "src"], cwd=ROOT, capture_output=True,
                         text=True, check=False)
    assert out.returncode == 0, out.stdout + out.stderr


def test_ruff() -> None:
    out = subprocess.run([sys.executable, "-m", "ruff", "check", "src", "tests"], cwd=ROOT, capture_output=True,
                         text=True, check=False)
    assert out.returncode == 0, out.stdout + out.stderr
