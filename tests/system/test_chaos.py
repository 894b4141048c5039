"""
The bounded random crash loop (tests/chaos.py; run it long with
`python -m tests.chaos --cycles N`).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.chaos import Result, Write, check, run

pytestmark = pytest.mark.integration


def test_checkerFindsEachKindOfFault() -> None:
    """
    The checker is not vacuous: on shared keys it finds a stale final write,
    stores that disagree, a write nobody sent, and an acknowledged write
    that never landed; on what the stores should hold it finds nothing.
    """
    told = {
        "/items/a-1": Write("/items/k0", "acked", sent=1.0, answered=2.0),
        "/items/a-2": Write("/items/k0", "acked", sent=3.0, answered=4.0),
        "/items/b-1": Write("/items/k1", "queued", sent=1.0, answered=2.0),
        "/items/c-1": Write("/items/k2", "acked", sent=1.0, answered=2.0),
    }
    good = {"/items/k0": b"/items/a-2", "/items/k1": b"/items/b-1", "/items/k2": b"/items/c-1"}
    clean = Result(cycles=0)
    check(clean, told, good, dict(good), keys=3)
    assert (clean.lost, clean.partial, clean.unexpected, clean.unsettled) == ([], [], [], [])
    stale = {**good, "/items/k0": b"/items/a-1"}
    faults = Result(cycles=0)
    check(faults, told, {**stale, "/items/k3": b"/items/z-9"}, {**stale, "/items/k1": b"/items/a-2"}, keys=3)
    assert faults.lost == ["/items/a-2"]
    assert faults.partial == ["/items/k1", "/items/k3"]
    assert faults.unexpected == []
    missing = Result(cycles=0)
    check(missing, told, {"/items/k0": b"/items/x"}, {"/items/k0": b"/items/x"}, keys=3)
    assert missing.lost == ["/items/c-1"] and missing.unsettled == ["/items/b-1"]
    assert missing.unexpected == ["/items/k0"]



def test_crashLoop(tmp_path: Path) -> None:
    """
    30 cycles of SIGKILL under concurrent writes: nothing acknowledged is
    lost, nothing is in one store only, nothing appears that was not sent,
    every write told queued lands, and no spare spool file holds a
    request's bytes once the server has stopped.
    """
    result = run(tmp_path, cycles=30, clients=4, seed=30)
    print(result.line())
    assert result.told["acked"] > 100, result.line()
    assert result.told["unknown"] > 0, "no request was ever cut by a kill: the test proves little"
    assert (result.lost, result.partial, result.unexpected, result.unsettled, result.unemptied) == ([], [], [], [], [])


def test_crashLoopOnSharedKeys(tmp_path: Path) -> None:
    """
    20 cycles of SIGKILL under concurrent writes over 5 shared keys: both
    stores hold the same write of each key, a write that no client sent
    never appears, and no key holds a write older than one sent after it
    was answered and then acknowledged or queued.
    """
    result = run(tmp_path, cycles=20, clients=4, seed=20, keys=5)
    print(result.line())
    assert result.told["acked"] > 100, result.line()
    assert (result.lost, result.partial, result.unexpected, result.unsettled, result.unemptied) == ([], [], [], [], [])
