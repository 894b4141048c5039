"""
The bounded random crash loop (tests/chaos.py; run it long with
`python -m tests.chaos --cycles N`).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from .chaos import run

pytestmark = pytest.mark.integration


def test_crashLoop(tmp_path: Path) -> None:
    """
    30 cycles of SIGKILL under concurrent writes: nothing acknowledged is
    lost, nothing is in one store only, nothing appears that was not sent,
    and every write told queued lands.
    """
    result = run(tmp_path, cycles=30, clients=4, seed=30)
    print(result.line())
    assert result.told["acked"] > 100, result.line()
    assert result.told["unknown"] > 0, "no request was ever cut by a kill: the test proves little"
    assert (result.lost, result.partial, result.unexpected, result.unsettled) == ([], [], [], [])
