"""
The package type-checks with mypy and the mypy_zope plugin.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.process

ROOT = Path(__file__).parents[2]


def test_mypy() -> None:
    """
    mypy (configured in pyproject.toml) finds no error in apicontainer/.
    """
    result = subprocess.run(
        [sys.executable, "-m", "mypy", "apicontainer"], cwd=ROOT, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr
