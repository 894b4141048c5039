"""
The spool's frame, its durable writes, and the UOW id and fail queue
records beside it.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from unittest import mock

from attrs import evolve

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from apicontainer.storage import _durable as durable
from apicontainer.blocking import inline
from apicontainer.storage._failqueue import FileFailQueue, RetryPolicy
from apicontainer.storage._spool import Spool, SpoolError, SpoolFull
from apicontainer.storage._spoolfile import CorruptSpoolFile, decode, encode
from apicontainer.uow import INLINE_BODY_BYTES, Report, SpooledBody, Status, UnitOfWork, Verdict
from apicontainer.storage._uowids import UOWIds

from tests.conftest import filesCreated, holdsBytes


def sample(uowId: int = 7, body: bytes = b'{"a": 1}') -> UnitOfWork:
    return UnitOfWork(
        id=uowId,
        method="PUT",
        key="/items/\u00e9",
        route="/items/<id>",
        body=body,
        contentType="application/json",
        receivedAt=1234.5,
        idempotencyKey="k-1",
        attempt=uowId,
    )


class FrameTests(SynchronousTestCase):
    """
    A spool file decodes to exactly what was written, and every torn or
    corrupt variant is detected.
    """

    def test_roundTrip(self) -> None:
        """
        Every field survives encode and decode.
        """
        uow = sample()
        self.assertEqual(decode(b"".join(encode(uow))), uow)

    def test_everyTruncationDetected(self) -> None:
        """
        A file cut at any length is refused.
        """
        data = b"".join(encode(sample()))
        for length in range(len(data)):
            with self.assertRaises(CorruptSpoolFile):
                decode(data[:length])

    def test_everyByteFlipDetected(self) -> None:
        """
        A file with any one byte changed is refused.
        """
        data = b"".join(encode(sample()))
        for index in range(len(data)):
            corrupt = bytearray(data)
            corrupt[index] ^= 0x41
            with self.assertRaises(CorruptSpoolFile):
                decode(bytes(corrupt))

    def test_trailingGarbageDetected(self) -> None:
        """
        Extra bytes after the checksum are refused.
        """
        with self.assertRaises(CorruptSpoolFile):
            decode(b"".join(encode(sample())) + b"\0")


class SpoolTests(SynchronousTestCase):
    """
    Spool files are written durably, read back, deleted and quarantined.
    """

    def setUp(self) -> None:
        self.base = Path(self.mktemp())
        self.spool = Spool(self.base / "spool", self.base / "quarantine", inline)
        self.spool.open()

    def test_interfaces(self) -> None:
        """
        The file spool provides ISpool, and the journals that write it in
        the server and in a child process provide IJournal.
        """
        from zope.interface.verify import verifyObject

        from apicontainer.interfaces import IJournal, ISpool
        from apicontainer.storage._journal import InlineJournal, ProcessJournal
        from apicontainer.storage._states import StateStore

        self.assertTrue(verifyObject(ISpool, self.spool))
        states = StateStore(self.base / "state.sqlite3", inline)
        self.assertTrue(verifyObject(IJournal, InlineJournal(self.spool, states)))
        self.assertTrue(verifyObject(IJournal, ProcessJournal(self.base, self.spool, None)))

    def test_writeIsDurable(self) -> None:
        """
        The file is written and renamed into place, then the file system is
        synced, before the write is acknowledged; no temporary file is left.
        """
        from apicontainer.storage import _spool as spoolModule

        events: list[str] = []
        realSync, realRename = spoolModule.syncFilesystem, os.rename

        def sync(path: Path) -> None:
            events.append("syncfs")
            realSync(path)

        def rename(a: object, b: object) -> None:
            events.append("rename")
            realRename(a, b)  # type: ignore[arg-type]

        with mock.patch.object(spoolModule, "syncFilesystem", sync), mock.patch.object(durable.os, "rename", rename):
            written = self.spool.write(sample())
        self.assertEqual(events, ["rename", "syncfs"])
        self.successResultOf(written)
        self.assertEqual(os.listdir(self.spool.directory), ["00000000000000000007.uow"])
        self.assertEqual(self.successResultOf(self.spool.load(7)), sample())
        self.assertEqual(self.spool.pending(), [7])

    def test_diskFull(self) -> None:
        """
        ENOSPC is SpoolFull; EIO is SpoolError; neither leaves a file.
        """
        import errno

        from apicontainer.storage import _spool as spoolModule

        for code, error in ((errno.ENOSPC, SpoolFull), (errno.EIO, SpoolError)):
            with mock.patch.object(durable.os, "writev", side_effect=OSError(code, os.strerror(code))):
                self.failureResultOf(self.spool.write(sample()), error)
            self.assertEqual(os.listdir(self.spool.directory), [])
        with mock.patch.object(spoolModule, "syncFilesystem", side_effect=OSError(errno.EIO, "EIO")):
            self.failureResultOf(self.spool.write(sample()), SpoolError)
        self.assertEqual(os.listdir(self.spool.directory), [], "a file whose sync failed is not trusted")

    def test_deleteAndQuarantine(self) -> None:
        """
        Delete removes the file; quarantine moves a corrupt one aside, out of
        the pending list.
        """
        self.successResultOf(self.spool.write(sample(1)))
        self.successResultOf(self.spool.write(sample(2)))
        self.assertTrue(self.successResultOf(self.spool.delete(1)))
        self.assertFalse(self.successResultOf(self.spool.delete(1)))
        path = self.spool.path(2)
        path.write_bytes(path.read_bytes()[:-3])
        self.failureResultOf(self.spool.load(2), CorruptSpoolFile)
        moved = self.successResultOf(self.spool.quarantine(2))
        self.assertEqual(moved.parent, self.base / "quarantine")
        self.assertEqual(self.spool.pending(), [])
        self.flushLoggedErrors()

    def test_largeBodyStreamsThrough(self) -> None:
        """
        A body larger than INLINE_BODY_BYTES is copied from the file it was
        received into, and the UOW the write gives back, like the one a load
        gives, refers to the spool file instead of holding the body.
        """
        body = os.urandom(3 * INLINE_BODY_BYTES + 5)
        received = io.BytesIO(body)
        large = SpooledBody.ofFile(received)
        self.assertIsInstance(large, SpooledBody)
        spooled = self.successResultOf(self.spool.write(evolve(sample(), body=large)))
        self.assertEqual(spooled._body, SpooledBody(self.spool.path(7), spooled._body.offset, len(body)))
        self.assertEqual(spooled.body, body)
        self.assertEqual(self.spool.path(7).read_bytes(), b"".join(encode(sample(body=body))))
        loaded = self.successResultOf(self.spool.load(7))
        self.assertEqual(loaded._body, spooled._body)
        self.assertEqual(loaded, sample(body=body))
        self.assertEqual(b"".join(loaded.bodyChunks()), body)
        self.assertEqual(loaded.payloadHash(), sample(body=body).payloadHash())

    def test_largeBodyCorruptionDetected(self) -> None:
        """
        A byte flipped in a large body, or a large file cut short, is caught
        by the load, which checks the whole file without holding it.
        """
        body = os.urandom(2 * INLINE_BODY_BYTES)
        self.successResultOf(self.spool.write(sample(body=body)))
        path = self.spool.path(7)
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 1
        path.write_bytes(bytes(data))
        self.failureResultOf(self.spool.load(7), CorruptSpoolFile)
        path.write_bytes(bytes(data[:-INLINE_BODY_BYTES]))
        self.failureResultOf(self.spool.load(7), CorruptSpoolFile)

    def test_smallBodyHeld(self) -> None:
        """
        A small body is held in memory, as received, and after a load.
        """
        self.assertEqual(SpooledBody.ofFile(io.BytesIO(b"abc")), b"abc")
        spooled = self.successResultOf(self.spool.write(sample()))
        self.assertIsInstance(spooled._body, bytes)
        self.assertIsInstance(self.successResultOf(self.spool.load(7))._body, bytes)

    def test_wrongIdInFile(self) -> None:
        """
        A valid frame under another UOW's name is refused.
        """
        self.spool.path(3).write_bytes(b"".join(encode(sample(4))))
        self.failureResultOf(self.spool.load(3), CorruptSpoolFile)


class SpareTests(SynchronousTestCase):
    """
    Deleted spool files are emptied and kept for reuse, so that a write
    does not create a file.
    """

    def setUp(self) -> None:
        self.base = Path(self.mktemp())
        self.spool = Spool(self.base / "spool", self.base / "quarantine", inline, self.base / "spares")
        self.spool.open()

    def test_deletedFileIsReused(self) -> None:
        """
        A deleted spool file is moved to the spares and emptied: zeros
        overwrite its bytes in place. Once a write's sync has covered that,
        a write goes through it (the same inode), without creating a file,
        and holds exactly the new UOW.
        """
        self.successResultOf(self.spool.write(sample(1, body=b"a much longer body than the next one")))
        written = self.spool.path(1).stat()
        self.assertTrue(self.successResultOf(self.spool.delete(1)))
        self.assertEqual(os.listdir(self.spool.directory), [])
        spare = self.base / "spares" / "1"
        self.assertEqual(
            (os.listdir(self.base / "spares"), spare.read_bytes(), spare.stat().st_blocks),
            (["1"], bytes(written.st_size), written.st_blocks),
        )
        with filesCreated() as created:
            self.successResultOf(self.spool.write(sample(2)))
        self.assertEqual((len(created), os.listdir(self.base / "spares")), (1, ["1"]))
        with filesCreated() as created:
            self.successResultOf(self.spool.write(sample(3, body=b"short")))
        self.assertEqual(created, [])
        self.assertEqual(self.spool.path(3).stat().st_ino, written.st_ino)
        self.assertEqual(os.listdir(self.base / "spares"), [])
        self.assertEqual(self.successResultOf(self.spool.load(3)), sample(3, body=b"short"))
        self.assertFalse(self.successResultOf(self.spool.delete(4)))

    def test_sparesAreBounded(self) -> None:
        """
        Beyond SPARES, a deleted file is removed.
        """
        from apicontainer.storage import _spool as spoolModule

        for uowId in (1, 2):
            self.successResultOf(self.spool.write(sample(uowId)))
        with mock.patch.object(spoolModule, "SPARES", 1):
            for uowId in (1, 2):
                self.assertTrue(self.successResultOf(self.spool.delete(uowId)))
        self.assertEqual((os.listdir(self.spool.directory), os.listdir(self.base / "spares")), ([], ["1"]))

    def test_sparesOutliveARestart(self) -> None:
        """
        Spares left by an earlier process are reused; they are never taken
        for spooled UOWs.
        """
        self.successResultOf(self.spool.write(sample(1)))
        self.successResultOf(self.spool.delete(1))
        spool = Spool(self.base / "spool", self.base / "quarantine", inline, self.base / "spares")
        spool.open()
        self.assertEqual(spool.pending(), [])
        self.successResultOf(spool.write(sample(2)))
        self.assertEqual(os.listdir(self.base / "spares"), [])
        self.assertEqual(spool.pending(), [2])

    def test_emptiedLater(self) -> None:
        """
        A file removed without being emptied is out of the spool but holds
        its bytes, and no write takes it until L{Spool.emptySpare} has
        emptied it and a write's sync has covered that.
        """
        for uowId in (1, 2):
            self.successResultOf(self.spool.write(sample(uowId)))
        written = self.spool.path(1).read_bytes()
        self.assertTrue(self.spool.remove(1, empty=False))
        spare = self.base / "spares" / "1"
        self.assertEqual((self.spool.pending(), spare.read_bytes()), ([2], written))
        with filesCreated() as created:
            self.successResultOf(self.spool.write(sample(3)))
        self.assertEqual(len(created), 1)
        self.assertEqual(spare.read_bytes(), written)
        self.assertTrue(self.spool.emptySpare())
        self.assertFalse(self.spool.emptySpare())
        self.assertEqual(spare.read_bytes(), bytes(len(written)))
        with filesCreated() as created:
            self.successResultOf(self.spool.write(sample(4)))
        self.assertEqual((len(created), os.listdir(self.base / "spares")), (1, ["1"]))
        with filesCreated() as created:
            self.successResultOf(self.spool.write(sample(5)))
        self.assertEqual((created, os.listdir(self.base / "spares")), ([], []))
        self.assertEqual(self.spool.pending(), [2, 3, 4, 5])

    def test_aStartEmptiesWhatACrashLeft(self) -> None:
        """
        Spares that a crash left holding a request's bytes are emptied, and
        the emptying synced, when the spool is opened; writes take them.
        """
        for uowId in (1, 2):
            self.successResultOf(self.spool.write(sample(uowId)))
            self.assertTrue(self.spool.remove(uowId, empty=False))
        spool = Spool(self.base / "spool", self.base / "quarantine", inline, self.base / "spares")
        spool.open()
        spares = sorted((p.name, holdsBytes(p)) for p in (self.base / "spares").iterdir())
        self.assertEqual(spares, [("1", False), ("2", False)])
        with filesCreated() as created:
            self.successResultOf(spool.write(sample(3)))
        self.assertEqual(created, [])

    def test_largeSpareTruncated(self) -> None:
        """
        A spare larger than L{ZEROED_BYTES} is emptied by truncating it,
        and a write through it holds exactly the new UOW.
        """
        from apicontainer.storage import _spool as spoolModule

        self.successResultOf(self.spool.write(sample(1, body=b"x" * 100)))
        with mock.patch.object(spoolModule, "ZEROED_BYTES", 99):
            self.assertTrue(self.successResultOf(self.spool.delete(1)))
        self.assertEqual((self.base / "spares" / "1").stat().st_size, 0)
        self.successResultOf(self.spool.write(sample(2)))
        self.assertEqual(self.successResultOf(self.spool.load(2)), sample(2))

    def test_unemptiedCountTowardsTheBound(self) -> None:
        """
        Files waiting to be emptied count towards L{SPARES}.
        """
        from apicontainer.storage import _spool as spoolModule

        for uowId in (1, 2):
            self.successResultOf(self.spool.write(sample(uowId)))
        with mock.patch.object(spoolModule, "SPARES", 1):
            for uowId in (1, 2):
                self.assertTrue(self.spool.remove(uowId, empty=False))
        self.assertEqual((os.listdir(self.spool.directory), os.listdir(self.base / "spares")), ([], ["1"]))

    def test_noSparesFolder(self) -> None:
        """
        When the spares folder is gone, with its spares, a write creates a
        file and a deletion removes it.
        """
        import shutil

        for uowId in (1, 2):
            self.successResultOf(self.spool.write(sample(uowId)))
        self.successResultOf(self.spool.delete(1))
        shutil.rmtree(self.base / "spares")
        self.successResultOf(self.spool.write(sample(3)))
        self.assertTrue(self.successResultOf(self.spool.delete(2)))
        self.assertEqual(self.spool.pending(), [3])
        self.assertEqual(self.successResultOf(self.spool.load(3)), sample(3))


class ShortWriteTests(SynchronousTestCase):
    def test_shortWritesComplete(self) -> None:
        """
        A file written in chunks holds all of them in order, however few
        bytes each system call takes.
        """
        realWritev = os.writev

        def stingy(fd: int, buffers: list[memoryview]) -> int:
            return realWritev(fd, [bytes(buffers[0][:3])])

        path = Path(self.mktemp())
        chunks = [b"head-", b"", b"the body", b"-crc"]
        with mock.patch.object(durable.os, "writev", stingy):
            durable.writeAtomically(path, chunks, sync=False)
            durable.writeFile(path.with_name("other"), chunks)
        self.assertEqual(path.read_bytes(), b"head-the body-crc")
        self.assertEqual(path.with_name("other").read_bytes(), b"head-the body-crc")

    def test_longerTemporaryCut(self) -> None:
        """
        A temporary file longer than the new content is written over and
        cut to its length: the file holds the new content only.
        """
        path = Path(self.mktemp())
        temporary = path.with_name("spare")
        temporary.write_bytes(b"an older and much longer content")
        durable.writeAtomically(path, [b"new", b" content"], sync=False, temporary=temporary)
        self.assertEqual((path.read_bytes(), temporary.exists()), (b"new content", False))

    def test_streamNotHeldWhole(self) -> None:
        """
        Chunks given as a stream are taken as they are written: a megabyte
        or so per system call, never the whole stream at once.
        """
        taken = 0
        seen: list[int] = []

        def stream():  # type: ignore[no-untyped-def]
            nonlocal taken
            for _ in range(64):
                taken += 1
                yield b"x" * 65536

        realWritev = os.writev

        def counting(fd: int, buffers: list[memoryview]) -> int:
            seen.append(taken)
            return realWritev(fd, buffers)

        path = Path(self.mktemp())
        with mock.patch.object(durable.os, "writev", counting):
            durable.writeFile(path, stream())
        self.assertEqual(path.stat().st_size, 64 * 65536)
        self.assertEqual(seen, [16, 32, 48, 64])


class UOWIdTests(SynchronousTestCase):
    """
    UOW ids are unique for the life of the data directory.
    """

    def test_uniqueAcrossRestarts(self) -> None:
        """
        Ids keep rising across blocks and reopenings, never repeating.
        """
        path = Path(self.mktemp())
        seen: list[int] = []
        for _ in range(3):
            ids = UOWIds(path, inline, blockSize=4)
            ids.open()
            for _ in range(6):
                seen.append(self.successResultOf(ids_allocate(ids)))
        self.assertEqual(len(seen), len(set(seen)))
        self.assertEqual(seen, sorted(seen))
        self.assertEqual(seen[:6], [1, 2, 3, 4, 5, 6])

    def test_corruptRecord(self) -> None:
        """
        An unreadable record stops the start rather than risk reusing ids.
        """
        path = Path(self.mktemp())
        path.write_text("garbage")
        with self.assertRaises(ValueError):
            UOWIds(path, inline).open()


def ids_allocate(ids: UOWIds):  # type: ignore[no-untyped-def]
    from twisted.internet.defer import Deferred

    return Deferred.fromCoroutine(ids.allocate())


class FailQueueTests(SynchronousTestCase):
    """
    The file fail queue records entries durably and schedules retries on its
    clock.
    """

    def setUp(self) -> None:
        self.directory = Path(self.mktemp())
        self.clock = Clock()
        self.queue = self.make()

    def make(self) -> FileFailQueue:
        queue = FileFailQueue(self.directory, inline, self.clock, RetryPolicy(1, 2, 5, 3), lambda: 1.0)
        self.assertEqual(queue.open(), [])
        return queue

    def report(self, uowId: int) -> Report:
        uow = sample(uowId)
        return Report.fromVerdicts(uow, {"a": Verdict.failed(503, "down")})

    def test_backoffAndParking(self) -> None:
        """
        Delays double up to max_delay_s, less up to half for jitter; the
        attempts count on from the previous entry, and after max_attempts the
        entry parks (or is stuck, when only its rollback was retried).
        """
        policy = RetryPolicy(1, 2, 5, 3)
        self.assertEqual([policy.delayAfter(n) for n in (1, 2, 3, 4)], [1, 2, 4, 5])
        self.assertEqual([policy.jittered(3, u) for u in (0.0, 0.5, 1.0)], [2, 3, 4])
        self.clock.advance(100)
        entry = self.queue.failed(self.report(1), "/items/<id>")
        self.assertEqual((entry.state, entry.attempts, entry.nextAttemptAt), (Status.queued, 1, 101))
        self.successResultOf(self.queue.put(entry))
        second = self.queue.failed(self.report(1), "/items/<id>")
        self.assertEqual((second.attempts, second.nextAttemptAt, second.firstFailedAt), (2, 102, 100))
        self.successResultOf(self.queue.put(second))
        parked = self.queue.failed(self.report(1), "/items/<id>")
        self.assertEqual((parked.state, parked.attempts, parked.nextAttemptAt), (Status.parked, 3, None))
        stuck = self.queue.failed(self.report(1), "/items/<id>", compensate=True)
        self.assertEqual(stuck.state, Status.stuck)

    def test_durableAndReloaded(self) -> None:
        """
        Entries survive a reopening; one that was retrying comes back queued.
        """
        self.successResultOf(self.queue.put(self.queue.failed(self.report(2), "/r")))
        self.successResultOf(self.queue.put(self.queue.failed(self.report(1), "/r")))
        self.assertEqual(self.successResultOf(self.queue.takeDue()), [])
        self.clock.advance(1)
        self.assertEqual([e.uow for e in self.successResultOf(self.queue.takeDue())], [1, 2])
        reopened = self.make()
        self.assertEqual([(e.uow, e.state) for e in reopened.list()], [(1, Status.queued), (2, Status.queued)])
        self.assertEqual(reopened.get(1).report, self.report(1))

    def test_drop(self) -> None:
        """
        Dropping removes the file; dropping twice finds nothing.
        """
        self.successResultOf(self.queue.put(self.queue.failed(self.report(1), "/r")))
        self.assertEqual(self.successResultOf(self.queue.drop(1)).uow, 1)
        self.assertIsNone(self.successResultOf(self.queue.drop(1)))
        self.assertEqual(os.listdir(self.directory), [])

    def test_unreadableEntryReported(self) -> None:
        """
        A damaged entry file is reported and left in place, not deleted.
        """
        (self.directory / "00000000000000000009.json").write_text("{")
        queue = FileFailQueue(self.directory, inline, self.clock, RetryPolicy())
        self.assertEqual([p.name for p in queue.open()], ["00000000000000000009.json"])
        self.assertTrue((self.directory / "00000000000000000009.json").exists())
        self.assertEqual((self.directory / "00000000000000000009.json").read_text(), "{")

    def test_interface(self) -> None:
        """
        The file fail queue provides IFailQueue.
        """
        from zope.interface.verify import verifyObject

        from apicontainer.interfaces import IFailQueue

        self.assertTrue(verifyObject(IFailQueue, self.queue))


class TemporaryLeftoverTests(SynchronousTestCase):
    """
    Temporary files of writes a crash cut short are removed at start.
    """

    def test_spoolOpenRemovesTemporaries(self) -> None:
        """
        A torn temporary spool file is removed when the spool opens; real
        spool files stay.
        """
        base = Path(self.mktemp())
        spool = Spool(base / "spool", base / "quarantine", inline)
        spool.open()
        self.successResultOf(spool.write(sample(1)))
        (base / "spool" / ".tmp-00000000000000000002.uow").write_bytes(b"ACSPO")
        Spool(base / "spool", base / "quarantine", inline).open()
        self.assertEqual(os.listdir(base / "spool"), ["00000000000000000001.uow"])
