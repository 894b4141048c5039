"""
The http stash against a real downstream Twisted server on loopback that
answers, refuses, hangs or drops the connection.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.web.server import Site

from apicontainer.blocking import inline
from apicontainer.stashes._http import HTTPStash
from apicontainer.testing import contractUOW
from apicontainer.uow import VerdictKind
from apicontainer.pipeline._worker import StashWorker

from tests.downstream import Downstream


@pytest.fixture
def downstream() -> Any:
    resource = Downstream()
    port = pytest_twisted.blockon(TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(Site(resource)))
    resource.url = f"http://127.0.0.1:{port.getHost().port}/api"
    yield resource
    pytest_twisted.blockon(port.stopListening())


@pytest.fixture
def stash(downstream: Any, tmp_path: Path) -> Any:
    stash = HTTPStash("api", downstream.url, tmp_path / "undo.sqlite3", inline)
    pytest_twisted.blockon(stash.start())
    yield stash
    pytest_twisted.blockon(stash.stop())


@pytest_twisted.ensureDeferred
async def test_storeReadRollback(downstream: Downstream, stash: HTTPStash) -> None:
    """
    Over real HTTP: a write lands downstream, reads back, and its rollback
    restores the previous body with a PUT, then absence with a DELETE.
    """
    first, second = contractUOW(1, b"one"), contractUOW(2, b"two")
    assert (await stash.stash(first)).kind is VerdictKind.stored
    await stash.commit(first)
    assert (await stash.stash(second)).kind is VerdictKind.stored
    assert (await stash.read("/items/1")).body == b"two"
    await stash.rollback(second)
    assert downstream.documents[b"/api/items/1"][0] == b"one"
    third = contractUOW(3, b"three", key="/items/3")
    await stash.stash(third)
    await stash.rollback(third)
    assert b"/api/items/3" not in downstream.documents


@pytest_twisted.ensureDeferred
async def test_serverErrorAndDrop(downstream: Downstream, stash: HTTPStash) -> None:
    """
    A 503 from downstream is a 503 verdict; a dropped connection is a 503.
    """
    downstream.mode = 503
    verdict = await stash.stash(contractUOW(1, b"x"))
    assert (verdict.kind, verdict.status) == (VerdictKind.failed, 503)
    downstream.mode = "drop"
    verdict = await stash.stash(contractUOW(2, b"x", key="/items/2"))
    assert (verdict.kind, verdict.status) == (VerdictKind.failed, 503)


@pytest_twisted.ensureDeferred
async def test_hangIsTimeout(downstream: Downstream, stash: HTTPStash) -> None:
    """
    A downstream that never answers gives the stash worker's 504 verdict.
    """
    downstream.mode = "hang"
    worker = StashWorker(stash, reactor, concurrency=1, timeout=0.5)
    verdict = await worker.call(contractUOW(1, b"x"))
    assert (verdict.kind, verdict.status) == (VerdictKind.failed, 504)
