"""
The journal's child process: spool writes and final states made durable
there, large bodies spooled by the server, errors, a child that ends, the
lock that makes the next server's child wait, and signals.
"""

from __future__ import annotations

import io
import os
import select
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import pytest_twisted
from attrs import evolve
from twisted.internet import reactor
from twisted.internet.defer import gatherResults
from twisted.internet.task import deferLater

from apicontainer.blocking import inline
from apicontainer.storage._childprotocol import frames, refused
from apicontainer.storage._journal import _SPOOL_ERRORS, ProcessJournal, _answers, _recordFields
from apicontainer.storage._spool import Spool, SpoolError, SpoolFull
from apicontainer.storage._spoolfile import fileName
from apicontainer.storage._states import StateRecord, StateStore
from apicontainer.testing import contractUOW
from apicontainer.uow import INLINE_BODY_BYTES, Report, SpooledBody, Status, UnitOfWork, Verdict
from tests.conftest import holdsBytes

pytestmark = pytest.mark.process


class Server:
    """
    What the server holds beside its journal: its own spool (no spares)
    and its own connection to the state store.
    """

    def __init__(self, data: Path) -> None:
        self.data = data
        self.spool = Spool(data / "spool", data / "quarantine", inline)
        self.spool.open()
        self.states = StateStore(data / "state.sqlite3", inline)
        self.states.open()
        self.journal = ProcessJournal(data, self.spool, reactor)

    def spooled(self) -> list[int]:
        return self.spool.pending()

    def spares(self) -> int:
        return len(os.listdir(self.data / "spares"))


@pytest.fixture
def server(tmp_path: Path):  # type: ignore[no-untyped-def]
    server = Server(tmp_path)
    yield server
    server.states.close()


def stored(uow: UnitOfWork) -> StateRecord:
    report = Report.fromVerdicts(uow, {"records": Verdict.stored()})
    return StateRecord.of(Status.stored, report, uow.route, 1000.0 + uow.id, uow)


def sample(uowId: int, body: bytes | SpooledBody = b"", idempotencyKey: str | None = None) -> UnitOfWork:
    uow = contractUOW(uowId, body or b"body %d" % uowId, key=f"/items/{uowId}")
    return evolve(uow, idempotencyKey=idempotencyKey)


@pytest_twisted.ensureDeferred
async def test_writeThenSettle(server: Server) -> None:
    """
    Spool writes made together are all durable and read back whole, keys
    included; settling them records each final state and removes each spool
    file, which the child keeps as a spare, empties once it has answered,
    and reuses once a write's sync has covered the emptying.
    """
    await server.journal.start()
    try:
        uows = [sample(n, idempotencyKey=f"key-{n}" if n % 2 else None) for n in range(1, 41)]
        written = await gatherResults([server.journal.write(uow) for uow in uows])
        assert written == uows
        assert server.spooled() == list(range(1, 41))
        assert [server.spool._load(n) for n in range(1, 41)] == uows
        removals = await gatherResults([server.journal.settle(stored(uow), removeSpool=True) for uow in uows])
        assert removals == [None] * 40
        assert server.spooled() == []
        assert server.spares() == 40
        spares = list((server.data / "spares").iterdir())
        for _ in range(500):  # 10 s
            if not any(holdsBytes(spare) for spare in spares):
                break
            await deferLater(reactor, 0.02, lambda: None)
        assert [holdsBytes(spare) for spare in spares] == [False] * 40
        for uow in uows:
            assert await server.states.get(uow.id) == stored(uow)
        assert await server.states.lastStored("/items/7") == 7
        assert (await server.states.byIdempotencyKey("key-7")).uow == 7  # type: ignore[union-attr]
        # The first write's sync covers the emptying; the next takes a spare.
        await server.journal.write(sample(41))
        assert server.spares() == 40
        await server.journal.write(sample(42))
        assert server.spares() == 39
        assert server.spool._load(42) == sample(42)
    finally:
        await server.journal.stop()


@pytest_twisted.ensureDeferred
async def test_aStopEmptiesTheSpares(server: Server) -> None:
    """
    A child told to stop right after its last removals empties their
    files before it ends.
    """
    await server.journal.start()
    uows = [sample(n) for n in range(1, 21)]
    await gatherResults([server.journal.write(uow) for uow in uows])
    settled = gatherResults([server.journal.settle(stored(uow), removeSpool=True) for uow in uows])
    await server.journal.stop()
    assert await settled == [None] * 20
    spares = list((server.data / "spares").iterdir())
    assert (len(spares), [holdsBytes(spare) for spare in spares]) == (20, [False] * 20)


@pytest_twisted.ensureDeferred
async def test_settleBatch(server: Server) -> None:
    """
    Many final states settled in one call through the child are each
    recorded and each spool file removed, with one outcome per record; an
    empty batch is answered too, and the child stays in step.
    """
    await server.journal.start()
    try:
        uows = [sample(n) for n in range(1, 6)]
        await gatherResults([server.journal.write(uow) for uow in uows])
        assert await server.journal.settleBatch([stored(uow) for uow in uows]) == [None] * 5
        for uow in uows:
            assert await server.states.get(uow.id) == stored(uow)
        assert server.spooled() == []
        assert await server.journal.settleBatch([]) == []
        assert await server.journal.settle(stored(sample(9)), removeSpool=False) is None
    finally:
        await server.journal.stop()


def test_settleBatchOutcomes(tmp_path: Path) -> None:
    """
    In the child, a removal that fails is the outcome of its own record
    only (the record is durable), and a record that cannot be written is
    refused alone.
    """
    spool = Spool(tmp_path / "spool", tmp_path / "quarantine", inline, tmp_path / "spares")
    spool.open()
    states = StateStore(tmp_path / "state.sqlite3", inline)
    states.open()
    remove = spool.remove

    def failOn3(uowId: int, empty: bool = True) -> None:
        if uowId == 3:
            raise OSError("the disk went away")
        remove(uowId, empty)

    spool.remove = failOn3  # type: ignore[method-assign]
    records = [_recordFields(stored(sample(n))) for n in (1, 2, 3)]
    records.append(["not a UOW id", *records[0][1:]])
    [(head, _)] = frames(bytearray(_answers(spool, states, [({"op": "states", "records": records}, b"")])[0]))
    assert head["results"][:3] == [[True, None], [True, None], [True, "the disk went away"]]
    assert head["results"][3][0] is False
    found: list[object] = []
    for n in (1, 2, 3):
        states.get(n).addCallback(found.append)
    assert found == [stored(sample(n)) for n in (1, 2, 3)]
    states.close()


@pytest_twisted.ensureDeferred
async def test_settleWithoutRemoval(server: Server) -> None:
    """
    A final state settled without removal (a fail queue entry is dropped
    first) leaves the spool file for the server to remove.
    """
    await server.journal.start()
    try:
        await server.journal.write(sample(1))
        assert await server.journal.settle(stored(sample(1)), removeSpool=False) is None
        assert server.spooled() == [1]
        assert await server.states.get(1) == stored(sample(1))
    finally:
        await server.journal.stop()


@pytest_twisted.ensureDeferred
async def test_largeBodiesAreSpooledByTheServer(server: Server) -> None:
    """
    A body that lies in the file it arrived in, or one too large to hold,
    is spooled by the server a chunk at a time; the UOW it gets back refers
    to the body in its spool file.
    """
    await server.journal.start()
    try:
        content = os.urandom(300000)
        arrived = sample(1, SpooledBody(io.BytesIO(content), 0, len(content)))
        held = sample(2, b"h" * (INLINE_BODY_BYTES + 1))
        for uow, body in ((arrived, content), (held, held.body)):
            spooled = await server.journal.write(uow)
            assert isinstance(spooled._body, SpooledBody)
            assert spooled._body.source == server.spool.path(uow.id)
            assert spooled.body == body
        assert server.spooled() == [1, 2]
    finally:
        await server.journal.stop()


@pytest_twisted.ensureDeferred
async def test_errorsNameTheProblem(server: Server) -> None:
    """
    A spool write the file system refuses fails with L{SpoolError} naming
    the problem, and leaves no file; a full disk is L{SpoolFull}.
    """
    await server.journal.start()
    try:
        spool = server.data / "spool"
        spool.rename(server.data / "spool.away")
        spool.write_bytes(b"a file where the folder goes")
        (server.data / "spares").rename(server.data / "spares.away")
        with pytest.raises(SpoolError, match="spool write failed: Not a directory"):
            await server.journal.write(sample(1))
        spool.unlink()
        (server.data / "spool.away").rename(spool)
        assert server.spooled() == []
    finally:
        await server.journal.stop()
    full = refused({"ok": False, "type": "SpoolFull", "error": "spool disk full: No space left on device"}, _SPOOL_ERRORS)
    assert isinstance(full, SpoolFull) and str(full) == "spool disk full: No space left on device"


@pytest_twisted.ensureDeferred
async def test_callsOfAKilledChildGoToANewOne(server: Server) -> None:
    """
    The calls a killed child did not answer are made again, by a new child:
    each of them succeeds, and what it did is durable.
    """
    await server.journal.start()
    try:
        first = server.journal.pid
        assert first is not None
        await gatherResults([server.journal.write(sample(n)) for n in range(1, 21)])
        writes = [server.journal.write(sample(n)) for n in range(21, 41)]
        settles = [server.journal.settle(stored(sample(n)), removeSpool=True) for n in range(1, 21)]
        os.kill(first, signal.SIGKILL)
        await gatherResults(writes + settles)
        assert server.journal.pid not in (None, first)
        assert server.spooled() == list(range(21, 41))
        assert await server.states.finalIds(list(range(1, 41))) == set(range(1, 21))
    finally:
        await server.journal.stop()


@pytest_twisted.ensureDeferred
async def test_aWriteLostTwiceIsRefusedAndLeavesNoFile(server: Server, tmp_path: Path) -> None:
    """
    A spool write whose child ends twice is refused, and a file the child
    left is removed: a refused request is never replayed.
    """
    dying = tmp_path / "dying.py"
    # Says it is ready, then ends at its first call.
    dying.write_text(
        "import os, sys\n"
        "from apicontainer.storage._childprotocol import frame\n"
        "os.write(1, frame({'ok': True}))\n"
        "os.read(0, 1 << 20)\n"
    )
    server.journal._runner._argv = [sys.executable, str(dying)]
    await server.journal.start()
    # As if the child had written the file before it ended.
    server.spool.directory.joinpath(fileName(1)).write_bytes(b"half a spool file")
    with pytest.raises(SpoolError, match="spool write failed: the process of the journal ended"):
        await server.journal.write(sample(1))
    assert server.spooled() == []
    await server.journal.stop()


@pytest_twisted.ensureDeferred
async def test_theNextServersChildWaits(server: Server) -> None:
    """
    The child of another server on the data directory (one restarted while
    the last one's child still finishes its batch) says it is ready only
    once that child has ended.
    """
    await server.journal.start()
    other = subprocess.Popen(
        [sys.executable, "-m", "apicontainer.storage._journal", str(server.data)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    try:
        assert select.select([other.stdout], [], [], 1.0)[0] == []
        await server.journal.stop()
        assert select.select([other.stdout], [], [], 10)[0] != []
        answer = os.read(other.stdout.fileno(), 4096)  # type: ignore[union-attr]
        assert list(frames(bytearray(answer))) == [({"ok": True}, b"")]
    finally:
        other.stdin.close()  # type: ignore[union-attr]
        assert other.wait(10) == 0


@pytest_twisted.ensureDeferred
async def test_stopSignalsDoNotEndTheChild(server: Server) -> None:
    """
    SIGINT (Ctrl-C reaches the whole process group) and SIGTERM (a service
    manager stops every process of the service) leave the child running:
    it ends when the server, done draining, closes its input.
    """
    await server.journal.start()
    try:
        pid = server.journal.pid
        assert pid is not None
        os.kill(pid, signal.SIGINT)
        os.kill(pid, signal.SIGTERM)
        await server.journal.write(sample(1))
        assert server.journal.pid == pid
    finally:
        await server.journal.stop()
    assert server.journal.pid is None
