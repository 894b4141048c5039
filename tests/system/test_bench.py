"""
A smoke run of the benchmark harness: it works, and says what it measured.
No speed is asserted here (docs/benchmarks.md holds the figures).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from bench.compare import summary
from bench.run import HEADLINE, cases, headlineSummary

pytestmark = pytest.mark.integration


def needWrk() -> None:
    if shutil.which("wrk") is None:
        reason = "wrk is not installed (apt-get install wrk)"
        if os.environ.get("APICONTAINER_REQUIRE_SERVICES") == "1":
            pytest.fail(reason)
        pytest.skip(reason)


def test_quickRun() -> None:
    """
    `python -m bench.run --quick` starts the server, the baseline, both
    floors and the FastAPI peer, drives them with wrk, and prints their
    rows with ratios.
    """
    needWrk()
    result = subprocess.run(
        [sys.executable, "-m", "bench.run", "--quick", "--seconds", "1"],
        cwd=Path(__file__).parents[2], capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    rows = [line for line in result.stdout.splitlines() if line.startswith("| 16 | 1 KiB | 2 | 0% |")]
    assert len(rows) == 1, result.stdout
    cells = [cell.strip() for cell in rows[0].strip("|").split("|")]
    assert float(cells[4]) > 0 and float(cells[5]) > 0 and float(cells[9]) > 0  # req/s, ratio, CPU
    # The baselines' table: the baseline, then each floor (req/s, ratio, p99, ratio, CPU).
    floors = [line for line in result.stdout.splitlines() if line.startswith("| 16 | 1 KiB | ") and len(line.split("|")) == 17]
    assert len(floors) == 1, result.stdout
    floor = [float(cell) for cell in floors[0].strip("|").split("|")[2:]]
    assert floor[0] > 0 and floor[1] > 0 and floor[2] > 0  # the baseline
    for rate, ratio, p99, p99Ratio, cpu in (floor[3:8], floor[8:13]):
        assert rate > 0 and p99 > 0 and cpu > 0
        assert ratio == pytest.approx(rate / floor[0], abs=0.01)
    # The peers' table: the Klein app, api-container, then the FastAPI peer
    # with one worker and with two, each with its ratio to the Klein app.
    systems = {
        cells[2]: [float(cell) for cell in cells[3:]]
        for line in result.stdout.splitlines()
        if line.startswith("| 16 | 1 KiB | ") and len(cells := [c.strip() for c in line.strip("|").split("|")]) == 8
    }
    assert list(systems) == ["Klein app that stores nothing", "api-container", "FastAPI, 1 worker", "FastAPI, 2 workers"]
    klein = systems["Klein app that stores nothing"][0]
    for rate, ratio, p99, p99Ratio, cpu in systems.values():
        assert rate > 0 and p99 > 0 and cpu > 0
        assert ratio == pytest.approx(rate / klein, abs=0.01)


def test_headlineSummary() -> None:
    """
    `--headline N` runs the c=32, 1 KiB, 2-stash case N times, and its
    summary counts the runs that meet each target against the Klein app
    and the better peer measured just before each.
    """
    assert cases(False, 3) == [HEADLINE] * 3
    runs = [
        {"baseline_rps": 7000.0, "baseline_p99": 25.0, "rps": 1200.0, "p99": 50.0, "p99_ratio": 2.0,
         "cpu_ms": 1.0, "peer_rps": 1000.0, "peer_cpu_ms": 1.2},
        {"baseline_rps": 6000.0, "baseline_p99": 30.0, "rps": 900.0, "p99": 120.0, "p99_ratio": 4.0,
         "cpu_ms": 1.1, "peer_rps": 1000.0, "peer_cpu_ms": 1.3},
    ]
    summary = headlineSummary(runs)
    assert "| 1 | 7000 | 25.00 | 1200 | 1000 | 1.20 | 50.00 | 2.00 | 1.00 | 1.20 |" in summary
    assert summary.endswith(
        "req/s >= the better peer's in 1 of 2 runs (median 1.05x); p99 <= 3x the Klein app's in 1 of 2 runs"
    )


def test_timers() -> None:
    """
    `python -m bench.timers` times the three ways and prints each against
    the run's own no-timeout figure.
    """
    result = subprocess.run(
        [sys.executable, "-m", "bench.timers", "--rounds", "5"],
        cwd=Path(__file__).parents[2], capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.splitlines()
    for kind in ("no timeout", "addTimeout", "Deadlines"):
        [line] = [line for line in lines if line.strip().startswith(kind)]
        assert " us per request (" in line and "x no timeout" in line, line


def test_spares(tmp_path: Path) -> None:
    """
    `python -m bench.spares` times both ways of emptying and reusing a
    spare, in a folder of the one it is given that it removes afterwards.
    """
    result = subprocess.run(
        [sys.executable, "-m", "bench.spares", "--files", "5", "--rounds", "1", "--dir", str(tmp_path)],
        cwd=Path(__file__).parents[2], capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.splitlines()
    for kind in ("truncate", "zero"):
        [line] = [line for line in lines if line.startswith(f"round 1 {kind}")]
        assert " us a file (CPU)" in line, line
    assert lines[-1].startswith("median CPU a file, both steps: truncate "), lines[-1]
    assert list(tmp_path.iterdir()) == []


def test_frames() -> None:
    """
    `python -m bench.frames` times a request's frames both ways, after
    checking that each way reads back what it made.
    """
    result = subprocess.run(
        [sys.executable, "-m", "bench.frames", "--requests", "10", "--rounds", "1"],
        cwd=Path(__file__).parents[2], capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.splitlines()
    for kind in ("json", "marshal"):
        [line] = [line for line in lines if line.startswith(f"round 1 {kind}")]
        assert line.endswith(" us a request (CPU, 8 frames)"), line
    assert lines[-1].startswith("median CPU a request: json "), lines[-1]


def test_compare() -> None:
    """
    `python -m bench.compare BEFORE AFTER` runs each revision's own package
    (here the last commit, from git, against the working tree) and sums up
    the rounds.
    """
    needWrk()
    root = Path(__file__).parents[2]
    if shutil.which("git") is None or not (root / ".git").exists():
        pytest.skip("not a git checkout")
    result = subprocess.run(
        [sys.executable, "-m", "bench.compare", "HEAD", ".", "--rounds", "1", "--seconds", "1"],
        cwd=root, capture_output=True, text=True, timeout=180,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    out = result.stdout
    assert "HEAD: apicontainer from " in out and "/HEAD/apicontainer/__init__.py" in out, out
    assert f".: apicontainer from {root / 'apicontainer' / '__init__.py'}" in out, out
    assert "round 1 HEAD: " in out and "round 1 .: " in out
    assert ". against HEAD: req/s higher in " in out and " of 1 rounds, median ratio " in out


def test_compareSummary() -> None:
    """
    The summary counts the rounds each way and gives the median ratio.
    """
    before = [{"rps": 100.0, "p99": 50.0, "cpu_ms": 2.0}, {"rps": 100.0, "p99": 50.0, "cpu_ms": 2.0}]
    after = [{"rps": 110.0, "p99": 40.0, "cpu_ms": 1.9}, {"rps": 90.0, "p99": 60.0, "cpu_ms": 2.1}]
    text = summary("a", "b", {"a": before, "b": after})
    assert "| a | 100 | 50.0 | 2.00 |" in text and "| b | 100 | 50.0 | 2.00 |" in text
    assert text.endswith(
        "b against a: req/s higher in 1 of 2 rounds, median ratio 1.000 (0.900-1.100);"
        " p99 lower in 1 of 2; CPU per request lower in 1 of 2"
    )


def test_countPerRequest() -> None:
    """
    `python -m bench.count` counts the reactor thread's work per request for
    the server and for the Klein app: every count is there, and the server
    does more of each kind than the app that stores nothing.
    """
    needWrk()
    result = subprocess.run(
        [sys.executable, "-m", "bench.count", "--seconds", "1", "--concurrency", "8"],
        cwd=Path(__file__).parents[2], capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    rows = {
        cells[0]: [float(cell) for cell in cells[1:]]
        for line in result.stdout.splitlines()
        if line.startswith("| ") and not line.startswith("| system") and not line.startswith("| ---")
        for cells in [[cell.strip() for cell in line.strip("|").split("|")]]
    }
    assert list(rows) == ["api-container", "Klein app that stores nothing"], result.stdout
    server, klein = rows["api-container"], rows["Klein app that stores nothing"]
    assert len(server) == 6 and all(value > 0 for value in server)
    assert server[0] > klein[0] and server[2] > klein[2]  # calls, Deferreds


def test_pipelineWithoutHTTP() -> None:
    """
    `python -m bench.pipeline` measures the server over HTTP and its
    pipeline driven from inside its process, every write settled.
    """
    needWrk()
    result = subprocess.run(
        [sys.executable, "-m", "bench.pipeline", "--rounds", "1", "--seconds", "1"],
        cwd=Path(__file__).parents[2], capture_output=True, text=True, timeout=180,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    [line] = [line for line in result.stdout.splitlines() if line.startswith("round 1:")]
    assert line.endswith("failed 0"), line
    overHTTP, withoutHTTP = (int(n) for n in re.findall(r"(\d+) writes/s", line))
    assert overHTTP > 0 and withoutHTTP > 0, line
    assert "without HTTP: " in result.stdout
