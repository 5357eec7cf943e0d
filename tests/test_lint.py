"""The code follows the lint rules in pyproject.toml (``[tool.ruff]``: pycodestyle and pyflakes, 120 columns)."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_ruff_finds_nothing():
    try:
        import ruff  # noqa: F401
    except ImportError:
        pytest.fail("ruff is missing: it is in the test extras (pip install -e '.[test]', or bash scripts/setup.sh)")
    proc = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "."], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
