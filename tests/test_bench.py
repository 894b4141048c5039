"""
A smoke run of the benchmark harness: it works, and says what it measured.
No speed is asserted here (BENCHMARKS.md holds the figures).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration


def test_quickRun() -> None:
    """
    `python -m bench.run --quick` starts the server and the baseline, drives
    them with wrk, and prints a table row with ratios.
    """
    if shutil.which("wrk") is None:
        reason = "wrk is not installed (apt-get install wrk)"
        if os.environ.get("APICONTAINER_REQUIRE_SERVICES") == "1":
            pytest.fail(reason)
        pytest.skip(reason)
    result = subprocess.run(
        [sys.executable, "-m", "bench.run", "--quick", "--seconds", "1"],
        cwd=Path(__file__).parent.parent, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    rows = [line for line in result.stdout.splitlines() if line.startswith("| 16 | 1 KiB | 2 | 0% |")]
    assert len(rows) == 1, result.stdout
    cells = [cell.strip() for cell in rows[0].strip("|").split("|")]
    assert float(cells[4]) > 0 and float(cells[5]) > 0
    floors = [line for line in result.stdout.splitlines() if line.startswith("| 16 | 1 KiB | ") and len(line.split("|")) == 10]
    assert len(floors) == 1, result.stdout
    floor = [cell.strip() for cell in floors[0].strip("|").split("|")]
    assert float(floor[2]) > 0 and float(floor[4]) > 0
