"""
The service's serial thread pools: a stash's own thread ends when the stash
stops, so a reload that replaces a stash leaves no thread behind.
"""

from __future__ import annotations

import threading
from pathlib import Path

import pytest_twisted
from twisted.internet import reactor

from apicontainer.server._service import SerialPools
from apicontainer.stashes._sqlite import SQLiteStash
from apicontainer.testing import contractUOW


def _named(name: str) -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith(f"PoolThread-apicontainer-{name}-")]


@pytest_twisted.ensureDeferred
async def test_stoppedStashEndsItsThread(tmp_path: Path) -> None:
    """
    A sqlite stash on a serial runner works on that runner's thread; once
    it has stopped, the thread has ended and the pools no longer hold it,
    while another stash's runner goes on.
    """
    pools = SerialPools(reactor)
    pools.start()
    try:
        old = SQLiteStash("old", tmp_path / "old.sqlite3", pools.runner("old"))
        kept = SQLiteStash("kept", tmp_path / "kept.sqlite3", pools.runner("kept"))
        for stash in (old, kept):
            await stash.start()
            await stash.stash(contractUOW(1))
        assert len(_named("old")) == 1 and len(pools) == 2
        await old.stop()
        assert _named("old") == [] and len(pools) == 1
        assert (await kept.stash(contractUOW(2))).status == 200
        await kept.stop()
        assert len(pools) == 0
    finally:
        pools.stop()
