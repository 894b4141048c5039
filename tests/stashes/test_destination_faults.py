"""
Destinations that stop answering, pause or answer too late: the stash's
verdict is a 5xx within its timeout, and a rollback afterwards leaves
nothing behind, whatever the late call did.
"""

from __future__ import annotations

import os
import signal
import uuid
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.task import deferLater
from twisted.web.server import Site

from apicontainer.blocking import inline
from apicontainer.stashes._http import HTTPStash
from apicontainer.stashes._postgres import PostgresStash
from apicontainer.stashes._redis import RedisStash
from apicontainer.testing import contractUOW
from apicontainer.uow import VerdictKind
from apicontainer.pipeline._worker import StashWorker

from tests.downstream import Downstream
from tests.services import ThrowawayPostgres, ThrowawayRedis


@pytest.mark.process
@pytest_twisted.ensureDeferred
async def test_pausedPostgres() -> None:
    """
    With PostgreSQL paused (SIGSTOP), a write times out (504); once it
    resumes, the late transaction may commit, and the rollback removes it.
    """
    cluster = ThrowawayPostgres()
    try:
        stash = PostgresStash("pg", cluster.dsn, reactor, table="docs", poolSize=2)
        await stash.start()
        worker = StashWorker(stash, reactor, concurrency=1, timeout=1.0)
        assert (await stash.stash(contractUOW(9, b"warm", key="/items/9"))).kind is VerdictKind.stored
        pids = cluster.pids()
        for pid in pids:
            os.kill(pid, signal.SIGSTOP)
        try:
            verdict = await worker.call(contractUOW(1, b"late"))
            assert (verdict.kind, verdict.status) == (VerdictKind.failed, 504)
        finally:
            for pid in pids:
                os.kill(pid, signal.SIGCONT)
        await deferLater(reactor, 0.5)
        await stash.rollback(contractUOW(1, b"late"))
        assert await stash.read("/items/1") is None
        assert (await stash.stash(contractUOW(2, b"after"))).kind is VerdictKind.stored
        stash.stop()
    finally:
        cluster.destroy()


@pytest.mark.process
@pytest_twisted.ensureDeferred
async def test_pausedRedis() -> None:
    """
    With Redis paused (SIGSTOP), a write fails within the stash's timeout;
    once it resumes, the rollback leaves nothing behind.
    """
    server = ThrowawayRedis()
    try:
        stash = RedisStash("cache", f"redis://127.0.0.1:{server.port}/1", prefix=f"t{uuid.uuid4().hex[:6]}:", timeout=1.0)
        await stash.start()
        worker = StashWorker(stash, reactor, concurrency=1, timeout=2.0)
        assert server.process is not None
        server.process.send_signal(signal.SIGSTOP)
        try:
            verdict = await worker.call(contractUOW(1, b"late"))
            assert verdict.kind is VerdictKind.failed and verdict.status in (503, 504)
        finally:
            server.process.send_signal(signal.SIGCONT)
        for _ in range(20):
            try:
                await stash.rollback(contractUOW(1, b"late"))
                break
            except Exception:
                await deferLater(reactor, 0.2)
        assert await stash.read("/items/1") is None
        await stash.stop()
    finally:
        server.destroy()


@pytest_twisted.ensureDeferred
async def test_downstreamAnswersAfterTimeout(tmp_path: Path) -> None:
    """
    A downstream that applies the write but answers after the timeout: the
    verdict is 504, and the rollback restores the before-image it had.
    """
    downstream = Downstream()
    downstream.clock = reactor
    downstream.lateBy = 1.0
    port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(Site(downstream))
    try:
        url = f"http://127.0.0.1:{port.getHost().port}/api"
        stash = HTTPStash("api", url, tmp_path / "undo.sqlite3", inline)
        await stash.start()
        first = contractUOW(1, b"before")
        await stash.stash(first)
        await stash.commit(first)
        downstream.mode = "late"
        worker = StashWorker(stash, reactor, concurrency=1, timeout=0.3)
        verdict = await worker.call(contractUOW(2, b"late"))
        assert (verdict.kind, verdict.status) == (VerdictKind.failed, 504)
        await deferLater(reactor, 1.2)
        assert downstream.documents[b"/api/items/1"][0] == b"late"
        downstream.mode = None
        await stash.rollback(contractUOW(2, b"late"))
        assert downstream.documents[b"/api/items/1"][0] == b"before"
        await stash.stop()
    finally:
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_downstreamTrickles(tmp_path: Path) -> None:
    """
    A downstream that answers a byte at a time, slower than the timeout:
    the verdict is 504, and the stash works again when it is healthy.
    """
    downstream = Downstream()
    downstream.clock = reactor
    downstream.lateBy = 0.2
    port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(Site(downstream))
    try:
        stash = HTTPStash("api", f"http://127.0.0.1:{port.getHost().port}", tmp_path / "undo.sqlite3", inline)
        await stash.start()
        downstream.mode = "trickle"
        worker = StashWorker(stash, reactor, concurrency=1, timeout=1.0)
        verdict = await worker.call(contractUOW(1, b"x"))
        assert (verdict.kind, verdict.status) == (VerdictKind.failed, 504)
        await stash.rollback(contractUOW(1, b"x"))
        downstream.mode = None
        assert (await worker.call(contractUOW(2, b"y", key="/items/2"))).kind is VerdictKind.stored
        await stash.stop()
    finally:
        await port.stopListening()
