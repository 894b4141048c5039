"""
The built-in stashes and the in-memory one keep the stash contract, and the
embedded ones keep their own promises on disk.
"""

from __future__ import annotations

import json
import os
import sqlite3
from pathlib import Path
from typing import Callable

from twisted.internet.defer import Deferred
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from apicontainer.blocking import inline
from apicontainer.interfaces import IStartable
from apicontainer.stashes._filesystem import FilesystemStash, currentVersion, encodeSegment
from apicontainer.stashes._http import HTTPStash
from apicontainer.stashes._sqlite import SQLiteStash
from apicontainer.testing import BatchMemoryStash, MemoryStash, StashContractTests
from apicontainer.uow import Document, UnitOfWork, VerdictKind
from tests.conftest import filesCreated


class BatchMemoryStashContractTests(StashContractTests, SynchronousTestCase):
    """
    The in-memory stash that takes batches keeps the contract, batches
    included.
    """

    def makeStash(self) -> BatchMemoryStash:
        return BatchMemoryStash("memory")


class MemoryStashContractTests(StashContractTests, SynchronousTestCase):
    """
    The in-memory stash of apicontainer.testing keeps the contract.
    """

    def makeStash(self) -> MemoryStash:
        return MemoryStash("memory")

    def refuse(self, stash: MemoryStash) -> None:
        stash.failWith = 400

    def test_refusalCheckCatchesHalfDoneWrite(self) -> None:
        """
        The refusal check fails for a stash that writes and then answers a
        4xx: it can tell a broken stash from a good one.
        """
        from apicontainer.testing import checkRefusalStoresNothing

        def halfway(stash: MemoryStash) -> None:
            stash.failWith, stash.failAfterWrite = 400, True

        failure = self.failureResultOf(
            Deferred.fromCoroutine(checkRefusalStoresNothing(MemoryStash("m"), halfway))
        )
        self.assertIn("a refused write changed the document", str(failure.value))


class SQLiteStashContractTests(StashContractTests, SynchronousTestCase):
    """
    The sqlite stash keeps the contract.
    """

    def makeStash(self) -> SQLiteStash:
        stash = SQLiteStash("records", Path(self.mktemp()) / "records.sqlite3", inline)
        self.successResultOf(stash.start())
        self.addCleanup(stash.stop)
        return stash


class SQLiteStashOpenTests(SynchronousTestCase):
    def test_openErrorNamesThePath(self) -> None:
        """
        A database that cannot be opened (its path is a directory) fails
        with SQLite's reason and the path.
        """
        path = Path(self.mktemp())
        path.mkdir(parents=True)
        failure = self.failureResultOf(SQLiteStash("records", path, inline).start(), sqlite3.Error)
        self.assertEqual(str(failure.value), f"unable to open database file: {path}")


class FilesystemStashStartTests(SynchronousTestCase):
    def test_sweepsTemporaries(self) -> None:
        """
        At start, the .tmp-* names that a crash left beside the documents
        (files and symlinks) are removed; the documents stay.
        """
        root = Path(self.mktemp())
        stash = FilesystemStash("files", root, inline)
        self.successResultOf(stash.start())
        self.successResultOf(stash.stash(uow(1, body=b"doc")))
        self.successResultOf(stash.commit(uow(1, body=b"doc")))
        self.successResultOf(stash.stop())
        [document] = [p for p in root.rglob("*.doc")]
        (document.parent / ".tmp-1.doc").write_bytes(b"half")
        os.symlink("1.v9", document.parent / ".tmp-2.doc")
        stash = FilesystemStash("files", root, inline)
        self.successResultOf(stash.start())
        self.addCleanup(stash.stop)
        self.assertEqual([p.name for p in document.parent.iterdir() if p.name.startswith(".tmp-")], [])
        self.assertEqual(self.successResultOf(stash.read("/items/1")).body, b"doc")


class FilesystemStashContractTests(StashContractTests, SynchronousTestCase):
    """
    The filesystem stash keeps the contract.
    """

    def makeStash(self) -> FilesystemStash:
        stash = FilesystemStash("files", Path(self.mktemp()), inline)
        self.successResultOf(stash.start())
        return stash


def withoutAttributes(case: SynchronousTestCase) -> None:
    """
    Make the file system refuse user extended attributes until the end of
    C{case}, as one that takes none does.
    """
    import errno
    from unittest import mock

    patcher = mock.patch.object(os, "setxattr", side_effect=OSError(errno.ENOTSUP, "Operation not supported"))
    patcher.start()
    case.addCleanup(patcher.stop)


class FilesystemStashSymlinkContractTests(StashContractTests, SynchronousTestCase):
    """
    The filesystem stash keeps the contract on a file system without user
    extended attributes, where its documents are symlinks.
    """

    def makeStash(self) -> FilesystemStash:
        withoutAttributes(self)
        stash = FilesystemStash("files", Path(self.mktemp()), inline)
        self.successResultOf(stash.start())
        return stash


def uow(uowId: int, key: str = "/items/1", body: bytes = b"x", **kw: object) -> UnitOfWork:
    return UnitOfWork(id=uowId, method="PUT", key=key, route="/items/<id>", body=body, **kw)  # type: ignore[arg-type]


class SQLiteStashTests(SynchronousTestCase):
    """
    What the sqlite stash writes to its database.
    """

    def setUp(self) -> None:
        self.path = Path(self.mktemp()) / "db.sqlite3"
        self.stash = SQLiteStash("records", self.path, inline, table="docs")
        self.successResultOf(self.stash.start())
        self.addCleanup(self.stash.stop)

    def test_interfaces(self) -> None:
        """
        It provides IStartable too.
        """
        self.assertTrue(verifyObject(IStartable, self.stash))

    def test_walAndFullSync(self) -> None:
        """
        The database is in WAL mode with synchronous=FULL (2).
        """
        connection = self.stash._connection
        assert connection is not None
        self.assertEqual(connection.execute("PRAGMA journal_mode").fetchone()[0], "wal")
        self.assertEqual(connection.execute("PRAGMA synchronous").fetchone()[0], 2)

    def test_rowAndUndoInOneTransaction(self) -> None:
        """
        A stored UOW leaves the row with its content type and UOW, and an undo
        row with the before-image; commit forgets the undo row.
        """
        first = uow(1, body=b"one", contentType="text/plain")
        self.successResultOf(self.stash.stash(first))
        self.successResultOf(self.stash.commit(first))
        second = uow(2, body=b"two")
        self.successResultOf(self.stash.stash(second))
        db = sqlite3.connect(self.path)
        self.assertEqual(
            db.execute("SELECT key, body, content_type, uow FROM docs").fetchall(),
            [("/items/1", b"two", None, 2)],
        )
        self.assertEqual(
            db.execute("SELECT uow, state, had_row, body, content_type, prev_uow FROM docs_undo").fetchall(),
            [(2, "prepared", 1, b"one", "text/plain", 1)],
        )
        self.successResultOf(self.stash.commit(second))
        self.assertEqual(db.execute("SELECT count(*) FROM docs_undo").fetchone()[0], 0)

    def test_databaseErrorIs503(self) -> None:
        """
        A stash that cannot open its database answers a 503 verdict, not an
        exception, and works again once the database can be opened.
        """
        import shutil

        self.successResultOf(self.stash.stop())
        shutil.move(self.path.parent, str(self.path.parent) + ".away")
        self.path.parent.write_bytes(b"")
        verdict = self.successResultOf(self.stash.stash(uow(1)))
        self.assertEqual((verdict.kind, verdict.status), (VerdictKind.failed, 503))
        self.path.parent.unlink()
        shutil.move(str(self.path.parent) + ".away", self.path.parent)
        self.assertEqual(self.successResultOf(self.stash.stash(uow(1))).kind, VerdictKind.stored)


class FilesystemStashTests(SynchronousTestCase):
    """
    What the filesystem stash writes to disk.
    """

    def setUp(self) -> None:
        self.root = Path(self.mktemp())
        self.stash = FilesystemStash("files", self.root, inline)
        self.successResultOf(self.stash.start())

    def test_interfaces(self) -> None:
        """
        It provides IStartable too.
        """
        self.assertTrue(verifyObject(IStartable, self.stash))

    def test_readableLayout(self) -> None:
        """
        The document is a hard link to its version file, which holds the
        body and, in extended attributes, its own name and its content
        type. A write creates its version and its batch's journal, no other
        file.
        """
        from unittest import mock

        with filesCreated() as created, mock.patch.object(os, "symlink") as symlink:
            self.successResultOf(self.stash.stash(uow(7, "/items/42", b"hello", contentType="text/plain")))
        self.assertEqual((created, symlink.call_count), (["42.v7", "batch-1.jsonl"], 0))
        pointer = self.root / "items" / "42.doc"
        self.assertFalse(pointer.is_symlink())
        self.assertTrue(pointer.samefile(self.root / "items" / "42.v7"))
        self.assertEqual(currentVersion(pointer), "42.v7")
        self.assertEqual(pointer.read_bytes(), b"hello")
        self.assertEqual(os.getxattr(pointer, "user.content_type"), b"text/plain")
        self.assertEqual(os.getxattr(pointer, "user.uow"), b"v7")
        self.assertEqual(sorted(p.name for p in (self.root / "items").iterdir()), ["42.doc", "42.v7"])

    def test_symlinksWithoutExtendedAttributes(self) -> None:
        """
        On a file system without user extended attributes the document is
        a symlink to its version, and the content type a file beside it.
        """
        withoutAttributes(self)
        self.stash = FilesystemStash("files", self.root, inline)
        self.successResultOf(self.stash.start())
        self.successResultOf(self.stash.stash(uow(7, "/items/42", b"hello", contentType="text/plain")))
        self.successResultOf(self.stash.commit(uow(7, "/items/42")))
        self.assertEqual(os.readlink(self.root / "items" / "42.doc"), "42.v7")
        self.assertEqual((self.root / "items" / "42.v7.type").read_text(), "text/plain")
        self.assertEqual(self.successResultOf(self.stash.read("/items/42")).contentType, "text/plain")

    def test_symlinkedDocumentsAreWrittenOver(self) -> None:
        """
        Symlinked documents (written where extended attributes were
        refused) are read, written over, and
        restored by a rollback.
        """
        from unittest import mock

        with mock.patch.object(self.stash, "_attributes", False):
            for uowId, key in ((1, "/items/a"), (2, "/items/b")):
                self.successResultOf(self.stash.stash(uow(uowId, key, b"old", contentType="text/old")))
                self.successResultOf(self.stash.commit(uow(uowId, key)))
        self.assertTrue((self.root / "items" / "a.doc").is_symlink())
        self.stash = FilesystemStash("files", self.root, inline)
        self.successResultOf(self.stash.start())
        self.assertEqual(self.successResultOf(self.stash.read("/items/a")).body, b"old")
        for uowId, key in ((11, "/items/a"), (12, "/items/b")):
            self.successResultOf(self.stash.stash(uow(uowId, key, b"new")))
        self.assertFalse((self.root / "items" / "a.doc").is_symlink())
        self.successResultOf(self.stash.rollback(uow(11, "/items/a")))
        self.assertEqual(os.readlink(self.root / "items" / "a.doc"), "a.v1")
        self.assertEqual(self.successResultOf(self.stash.read("/items/a")).contentType, "text/old")
        self.successResultOf(self.stash.commit(uow(12, "/items/b")))
        self.assertEqual(self.successResultOf(self.stash.read("/items/b")).body, b"new")
        self.assertEqual(sorted(p.name for p in (self.root / "items").glob("b.*")), ["b.doc", "b.v12"])

    def test_deletionLeavesAnEmptyVersion(self) -> None:
        """
        A deletion's version is an empty file that the document links to;
        it reads as absent, and goes when a later write commits.
        """
        self.successResultOf(self.stash.stash(uow(1, "/items/42", b"one")))
        self.successResultOf(self.stash.commit(uow(1, "/items/42")))
        deletion = UnitOfWork(id=2, method="DELETE", key="/items/42", route="/items/<id>", body=b"")
        self.successResultOf(self.stash.stash(deletion))
        self.successResultOf(self.stash.commit(deletion))
        self.assertEqual(currentVersion(self.root / "items" / "42.doc"), "42.d2")
        self.assertEqual((self.root / "items" / "42.doc").read_bytes(), b"")
        self.assertIsNone(self.successResultOf(self.stash.read("/items/42")))
        self.assertEqual(self.successResultOf(self.stash.stash(uow(1, "/items/42"))).kind, VerdictKind.declined)
        self.successResultOf(self.stash.stash(uow(3, "/items/42", b"three")))
        self.successResultOf(self.stash.commit(uow(3, "/items/42")))
        self.assertEqual(sorted(p.name for p in (self.root / "items").iterdir()), ["42.doc", "42.v3"])

    def test_contentTypeWithoutExtendedAttributes(self) -> None:
        """
        Where the file system takes no user extended attributes, the content
        type goes to a file beside the version; either way it is read back,
        also for versions written before.
        """
        import errno
        from unittest import mock

        from apicontainer.storage import _durable as durable

        self.successResultOf(self.stash.stash(uow(1, "/items/a", b"a", contentType="text/a")))
        with mock.patch.object(durable.os, "setxattr", side_effect=OSError(errno.ENOTSUP, "Operation not supported")):
            self.successResultOf(self.stash.stash(uow(2, "/items/b", b"b", contentType="text/b")))
            self.successResultOf(self.stash.stash(uow(3, "/items/c", b"c", contentType="text/c")))
        self.assertEqual((self.root / "items" / "b.v2.type").read_text(), "text/b")
        self.assertEqual((self.root / "items" / "c.v3.type").read_text(), "text/c")
        for key, expected in (("/items/a", "text/a"), ("/items/b", "text/b"), ("/items/c", "text/c")):
            self.assertEqual(self.successResultOf(self.stash.read(key)).contentType, expected)
        self.successResultOf(self.stash.commit(uow(2, "/items/b")))
        self.successResultOf(self.stash.stash(uow(4, "/items/b", b"b2")))
        self.successResultOf(self.stash.commit(uow(4, "/items/b")))
        self.assertEqual(sorted(p.name for p in (self.root / "items").glob("b.*")), ["b.doc", "b.v4"])

    def test_tornUndoRecordIsIgnored(self) -> None:
        """
        An undo record torn by a crash (its batch never synced, so its
        pointer never swapped) counts as unwritten: the write is done again
        and the record replaced by a whole one. Whole records of the same
        journal still count.
        """
        whole = {"uow": 8, "key": "/items/43", "attempt": 1, "before": None, "target": "43.v8"}
        (self.root / ".undo" / "batch-3.jsonl").write_bytes(
            json.dumps(whole).encode() + b'\n[1]\n"uow"\n{"uow": 9, "key": "/items/44", "att'
        )
        self.stash = FilesystemStash("files", self.root, inline)  # the restart after the crash
        self.successResultOf(self.stash.start())
        self.assertEqual(os.listdir(self.root / ".undo"), ["batch-3.jsonl"])
        for uowId, key in ((8, "/items/43"), (9, "/items/44")):
            verdict = self.successResultOf(self.stash.stash(uow(uowId, key, b"hello")))
            self.assertEqual(verdict.kind, VerdictKind.stored)
            self.assertEqual(self.successResultOf(self.stash.read(key)).body, b"hello")
        self.assertEqual(verdict.detail, None)
        self.assertEqual(self.successResultOf(self.stash.stash(uow(8, "/items/43"))).detail, "already stored")
        for uowId, key in ((8, "/items/43"), (9, "/items/44")):
            self.successResultOf(self.stash.commit(uow(uowId, key)))
        self.assertEqual(currentVersion(self.root / "items" / "43.doc"), "43.v8")
        self.assertEqual(list((self.root / ".undo").iterdir()), [])

    def test_sparesAreTaken(self) -> None:
        """
        L{FilesystemStash.prepareSpare} makes empty files in C{.spares/}, up
        to SPARES; a write renames them into place as its version and its
        journal, and creates no file.
        """
        from unittest import mock

        with mock.patch.object(self.stash._spares, "limit", 3):
            made = 0
            while self.stash.prepareSpare():
                made += 1
        spares = self.root / ".spares"
        inodes = {path.stat().st_ino for path in spares.iterdir()}
        self.assertEqual((made, len(inodes)), (3, 3))
        with filesCreated() as created:
            self.successResultOf(self.stash.stash(uow(7, "/items/42", b"hello", contentType="text/plain")))
        self.assertEqual(created, [])
        version = self.root / "items" / "42.v7"
        journal = self.root / ".undo" / "batch-1.jsonl"
        left = {path.stat().st_ino for path in spares.iterdir()}
        self.assertEqual({version.stat().st_ino, journal.stat().st_ino} | left, inodes)
        self.assertEqual(self.successResultOf(self.stash.read("/items/42")), Document(b"hello", "text/plain", 7))
        self.assertEqual(os.getxattr(version, "user.uow"), b"v7")

    def test_sparesOutliveARestart(self) -> None:
        """
        Spares made by an earlier process are taken after a restart.
        """
        self.stash.prepareSpare()
        self.stash = FilesystemStash("files", self.root, inline)
        self.successResultOf(self.stash.start())
        with filesCreated() as created:
            self.successResultOf(self.stash.stash(uow(7, "/items/42", b"hello")))
        self.assertEqual(created, ["batch-1.jsonl"])
        self.assertEqual(os.listdir(self.root / ".spares"), [])

    def test_onlyEmptyFilesAreSpares(self) -> None:
        """
        A start takes only the empty files of C{.spares/} as spares (a
        version written through one is not truncated first), and removes
        any other.
        """
        self.stash.prepareSpare()
        (self.root / ".spares" / "stray").write_bytes(b"not a spare")
        self.stash = FilesystemStash("files", self.root, inline)
        self.successResultOf(self.stash.start())
        self.assertEqual(len(os.listdir(self.root / ".spares")), 1)
        self.successResultOf(self.stash.stash(uow(7, "/items/42", b"hi")))
        self.assertEqual((self.root / "items" / "42.v7").read_bytes(), b"hi")

    def test_aDeletionWithoutAttributesTakesNoSpare(self) -> None:
        """
        Where the document is a symlink, a deletion writes no version, and
        leaves the spares where they are.
        """
        withoutAttributes(self)
        self.stash = FilesystemStash("files", self.root, inline)
        self.successResultOf(self.stash.start())
        self.successResultOf(self.stash.stash(uow(1, "/items/42", b"one")))
        self.successResultOf(self.stash.commit(uow(1, "/items/42")))
        while self.stash.prepareSpare():
            pass
        deletion = UnitOfWork(id=2, method="DELETE", key="/items/42", route="/items/<id>", body=b"")
        self.successResultOf(self.stash.stash(deletion))
        self.assertEqual(os.readlink(self.root / "items" / "42.doc"), "42.d2")
        self.assertFalse((self.root / "items" / "42.d2").exists())
        self.assertIsNone(self.successResultOf(self.stash.read("/items/42")))

    def test_oneJournalPerBatch(self) -> None:
        """
        The undo records of a batch share one journal, which goes when its
        last record does: a batch of writes creates one file per version
        and one journal.
        """
        stash, runAll = self.batched()
        first = stash.stash(uow(1, "/items/1"))
        rest = [stash.stash(uow(uowId, f"/items/{uowId}")) for uowId in (2, 3, 4)]
        with filesCreated() as created:
            runAll()
        for verdict in [first, *rest]:
            self.assertEqual(self.successResultOf(verdict).kind, VerdictKind.stored)
        self.assertEqual(created, ["1.v1", "batch-1.jsonl", "2.v2", "3.v3", "4.v4", "batch-2.jsonl"])
        journal = self.root / "batched" / ".undo" / "batch-2.jsonl"
        self.assertEqual([r["uow"] for r in map(json.loads, journal.read_bytes().splitlines())], [2, 3, 4])
        for uowId in (2, 3):
            self.successResultOf(self.runNow(stash.commit(uow(uowId, f"/items/{uowId}")), runAll))
        self.assertTrue(journal.exists())
        self.successResultOf(self.runNow(stash.commit(uow(4, "/items/4")), runAll))
        self.assertFalse(journal.exists())

    def batched(self) -> tuple[FilesystemStash, Callable[[], None]]:
        """
        A stash whose batches wait until the returned function runs them,
        so that the operations submitted until then go in one batch.
        """
        pending: list[tuple[Callable[[], object], Deferred[object]]] = []

        def later(f: Callable[..., object], *args: object) -> Deferred[object]:
            done: Deferred[object] = Deferred()
            pending.append((lambda: f(*args), done))
            return done

        def runAll() -> None:
            while pending:
                call, done = pending.pop(0)
                done.callback(call())

        stash = FilesystemStash("files", self.root / "batched", inline)
        self.successResultOf(stash.start())
        stash._group._blocking = later  # type: ignore[attr-defined]
        return stash, runAll

    @staticmethod
    def runNow(result: Deferred[object], runAll: Callable[[], None]) -> Deferred[object]:
        runAll()
        return result

    def test_oneSyncPerBatch(self) -> None:
        """
        In a batch of new writes and of commits whose swaps no sync has
        covered yet, one syncfs makes the writes durable and covers the
        commits.
        """
        from unittest import mock

        from apicontainer.stashes import _filesystem as filesystemModule

        stash, runAll = self.batched()
        first = [stash.stash(uow(uowId, f"/items/{uowId}")) for uowId in (1, 2)]
        runAll()
        for verdict in first:
            self.assertEqual(self.successResultOf(verdict).kind, VerdictKind.stored)
        with mock.patch.object(
            filesystemModule, "syncFilesystem", wraps=filesystemModule.syncFilesystem
        ) as sync:
            mixed = [stash.commit(uow(1, "/items/1")), stash.stash(uow(3, "/items/3")),
                     stash.commit(uow(2, "/items/2")), stash.stash(uow(4, "/items/4"))]
            runAll()
        self.assertEqual(sync.call_count, 1)
        for result in mixed:
            self.successResultOf(result)
        [journal] = (self.root / "batched" / ".undo").iterdir()
        self.assertEqual([r["uow"] for r in map(json.loads, journal.read_bytes().splitlines())], [3, 4])

    def test_batchSeesItsOwnSwaps(self) -> None:
        """
        An operation on a key whose swap is pending in the same batch sees
        the swap: a second write's before-image is the first write.
        """
        stash, runAll = self.batched()
        stash.stash(uow(9, "/items/other"))  # a batch of its own: the next two go together
        writes = [stash.stash(uow(1, "/items/k", b"one")), stash.stash(uow(2, "/items/k", b"two"))]
        runAll()
        for verdict in writes:
            self.assertEqual(self.successResultOf(verdict).kind, VerdictKind.stored)
        self.successResultOf(self.runNow(stash.rollback(uow(2, "/items/k")), runAll))
        self.assertEqual(self.successResultOf(self.runNow(stash.read("/items/k"), runAll)).body, b"one")

    def test_rolledBackRecordStaysOutAfterARestart(self) -> None:
        """
        A rolled-back record stays in its journal while the journal holds
        others; after a restart it does not count (its UOW's marker says it
        was rolled back), and the others do.
        """
        self.successResultOf(self.stash.stash(uow(1, "/items/a", b"old")))
        self.successResultOf(self.stash.commit(uow(1, "/items/a")))
        journal = self.root / ".undo" / "batch-9.jsonl"
        journal.write_bytes(b"".join(
            json.dumps({"uow": uowId, "key": key, "attempt": 1, "before": before, "target": target}).encode() + b"\n"
            for uowId, key, before, target in ((5, "/items/a", "a.v1", "a.v5"), (6, "/items/b", None, "b.v6"))
        ))
        self.stash = FilesystemStash("files", self.root, inline)
        self.successResultOf(self.stash.start())
        for uowId, key in ((5, "/items/a"), (6, "/items/b")):
            self.successResultOf(self.stash.stash(uow(uowId, key, b"new")))
        self.successResultOf(self.stash.rollback(uow(5, "/items/a")))
        self.assertTrue(journal.exists())
        self.stash = FilesystemStash("files", self.root, inline)
        self.successResultOf(self.stash.start())
        self.assertEqual(self.successResultOf(self.stash.read("/items/a")).body, b"old")
        self.assertEqual(self.successResultOf(self.stash.stash(uow(5, "/items/a"))).kind, VerdictKind.declined)
        self.successResultOf(self.stash.rollback(uow(6, "/items/b")))
        self.assertIsNone(self.successResultOf(self.stash.read("/items/b")))
        self.assertFalse(journal.exists())

    def test_undoRecordsSurviveARestart(self) -> None:
        """
        Undo records, in their journals, are read back at start: a rollback
        after a restart restores the before-image, also of a key too long
        for a file name.
        """
        longKey = "/items/" + "k" * 4100
        keys = ((1, "/items/short"), (2, longKey), (3, "/items/third"))
        for uowId, key in keys:
            self.successResultOf(self.stash.stash(uow(uowId, key, b"first")))
            self.successResultOf(self.stash.commit(uow(uowId, key)))
            self.successResultOf(self.stash.stash(uow(uowId + 10, key, b"second")))
        self.stash = FilesystemStash("files", self.root, inline)
        self.successResultOf(self.stash.start())
        for uowId, key in keys:
            self.successResultOf(self.stash.rollback(uow(uowId + 10, key)))
            self.assertEqual(self.successResultOf(self.stash.read(key)).body, b"first")
        self.assertEqual(list((self.root / ".undo").iterdir()), [])

    def test_rolledBackMarkersSurviveARestart(self) -> None:
        """
        A rollback that came before its stash still turns the late stash
        away after a restart; a later attempt of the UOW stores.
        """
        self.successResultOf(self.stash.rollback(uow(5, "/items/5")))
        self.stash = FilesystemStash("files", self.root, inline)
        self.successResultOf(self.stash.start())
        late = self.successResultOf(self.stash.stash(uow(5, "/items/5")))
        self.assertEqual(late.kind, VerdictKind.declined)
        self.assertIsNone(self.successResultOf(self.stash.read("/items/5")))
        again = self.successResultOf(self.stash.stash(uow(5, "/items/5", b"again", attempt=6)))
        self.assertEqual(again.kind, VerdictKind.stored)
        self.successResultOf(self.stash.commit(uow(5, "/items/5", attempt=6)))
        self.assertEqual(list((self.root / ".rolledback").iterdir()), [])

    def test_commitWaitsForADurableSwap(self) -> None:
        """
        A commit syncs the file system only when no sync since its pointer
        swap has made the swap durable: the next batch's sync serves it.
        """
        from unittest import mock

        from apicontainer.stashes import _filesystem as filesystemModule

        with mock.patch.object(
            filesystemModule, "syncFilesystem", wraps=filesystemModule.syncFilesystem
        ) as sync:
            self.successResultOf(self.stash.stash(uow(2, "/items/2")))
            self.successResultOf(self.stash.stash(uow(3, "/items/3")))
            self.assertEqual(sync.call_count, 2)
            self.successResultOf(self.stash.commit(uow(2, "/items/2")))
            self.assertEqual(sync.call_count, 2)  # covered by uow 3's batch
            self.successResultOf(self.stash.commit(uow(3, "/items/3")))
            self.assertEqual(sync.call_count, 3)

    def test_commitRemovesOldVersion(self) -> None:
        """
        After commit only the current version is left.
        """
        for uowId, body in ((1, b"one"), (2, b"two")):
            self.successResultOf(self.stash.stash(uow(uowId, body=body)))
            self.successResultOf(self.stash.commit(uow(uowId)))
        self.assertEqual(sorted(p.name for p in (self.root / "items").iterdir()), ["1.doc", "1.v2"])
        self.assertEqual(list((self.root / ".undo").iterdir()), [])

    def test_hostileKeysStayInsideRoot(self) -> None:
        """
        Keys whose segments look like path tricks map to plain names under
        the root.
        """
        outside = self.root.parent / "escaped"
        for key in ("/../escaped", "/a/../../escaped", "/.undo/1.json", "/%2e%2e", "/x.doc/y", "/~a"):
            self.successResultOf(self.stash.stash(uow(len(key), key, b"z")))
        self.assertFalse(outside.exists())
        for path in self.root.rglob("*"):
            self.assertTrue(path.resolve().is_relative_to(self.root.resolve()), path)
        self.assertEqual(encodeSegment(".."), "%2E%2E")
        self.assertEqual(encodeSegment("a/b"), "a%2Fb")
        self.assertTrue(encodeSegment("x" * 500).startswith("~"))

    def test_rootReplacedByFileIs503(self) -> None:
        """
        When the root is no longer a directory, the verdict is a 503.
        """
        import shutil

        shutil.rmtree(self.root)
        self.root.write_bytes(b"not a directory")
        verdict = self.successResultOf(self.stash.stash(uow(1)))
        self.assertEqual((verdict.kind, verdict.status), (VerdictKind.failed, 503))


class HTTPStashContractTests(StashContractTests, SynchronousTestCase):
    """
    The http stash keeps the contract, against an in-memory downstream.
    """

    def makeStash(self) -> HTTPStash:
        from treq.testing import StubTreq

        from tests.downstream import Downstream

        self.downstream = Downstream()
        stash = HTTPStash(
            "api", "http://downstream.test/api", Path(self.mktemp()) / "undo.sqlite3", inline,
            http=StubTreq(self.downstream),
        )
        self.successResultOf(stash.start())
        self.addCleanup(stash.stop)
        return stash

    def refuse(self, stash: HTTPStash) -> None:
        self.downstream.mode = 400


class HTTPStashTests(SynchronousTestCase):
    """
    What the http stash sends downstream.
    """

    def setUp(self) -> None:
        from treq.testing import StubTreq

        from tests.downstream import Downstream

        self.downstream = Downstream()
        self.stash = HTTPStash(
            "api", "http://downstream.test/api", Path(self.mktemp()) / "undo.sqlite3", inline,
            headers={"Authorization": "Bearer t"}, http=StubTreq(self.downstream),
        )
        self.successResultOf(self.stash.start())
        self.addCleanup(self.stash.stop)

    def test_forwardWithBeforeImageAndKey(self) -> None:
        """
        A write is a GET (before-image) then the same method with the body,
        content type, configured headers and an Idempotency-Key per UOW.
        """
        self.successResultOf(self.stash.stash(uow(3, body=b"doc", contentType="application/json")))
        self.assertEqual(
            self.downstream.requests,
            [(b"GET", b"/api/items/1", None), (b"PUT", b"/api/items/1", b"apicontainer-3")],
        )
        self.assertEqual(self.downstream.documents[b"/api/items/1"], (b"doc", b"application/json"))

    def test_downstreamStatusIsVerdict(self) -> None:
        """
        The downstream's 4xx or 5xx is the verdict's status.
        """
        for status in (409, 502):
            self.downstream.mode = status
            verdict = self.successResultOf(self.stash.stash(uow(status, key=f"/items/{status}")))
            self.assertEqual((verdict.kind, verdict.status), (VerdictKind.failed, status))

    def test_compensationFailureRaises(self) -> None:
        """
        A compensating request the downstream refuses is a failed rollback.
        """
        from apicontainer.stashes._http import DownstreamError

        self.successResultOf(self.stash.stash(uow(1)))
        self.downstream.mode = 500
        self.failureResultOf(self.stash.rollback(uow(1)), DownstreamError)
        self.downstream.mode = None
        self.successResultOf(self.stash.rollback(uow(1)))
        self.assertEqual(self.downstream.documents, {})


class PartTests(SynchronousTestCase):
    """
    A stash with part: NAME gets only that multipart part.
    """

    def test_partOnly(self) -> None:
        """
        Only the named part reaches the stash, with its own content type; a
        request without it is declined and reaches nothing; a malformed
        multipart body is a 400.
        """
        from twisted.internet.task import Clock

        from apicontainer.pipeline._worker import StashWorker

        stash = MemoryStash("images")
        worker = StashWorker(stash, Clock(), part="image")
        boundary = "XyZ"
        body = (
            f"--{boundary}\r\nContent-Disposition: form-data; name=\"doc\"\r\n\r\n{{}}\r\n"
            f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"a.png\"\r\n"
            f"Content-Type: image/png\r\n\r\nPNGDATA\r\n--{boundary}--\r\n"
        ).encode()
        ctype = f"multipart/form-data; boundary={boundary}"
        verdict = self.successResultOf(Deferred.fromCoroutine(worker.call(uow(1, body=body, contentType=ctype))))
        self.assertEqual(verdict.kind, VerdictKind.stored)
        document = self.successResultOf(stash.read("/items/1"))
        self.assertEqual((document.body, document.contentType), (b"PNGDATA", "image/png"))
        declined = self.successResultOf(
            Deferred.fromCoroutine(worker.call(uow(2, "/items/2", b"{}", contentType="application/json")))
        )
        self.assertEqual(declined.kind, VerdictKind.declined)
        self.assertEqual([call for call in stash.calls if call[1] == 2], [])
        malformed = self.successResultOf(
            Deferred.fromCoroutine(worker.call(uow(3, "/items/3", b"junk", contentType=ctype)))
        )
        self.assertEqual((malformed.kind, malformed.status), (VerdictKind.failed, 400))


class CrashMidWriteTests(SynchronousTestCase):
    """
    A crash between a stash's durable undo record and its write must not
    make a replay answer stored without the write.
    """

    def test_filesystemCompletesTheWrite(self) -> None:
        """
        The filesystem stash, killed after its undo record and before the
        pointer swap, completes the write when the UOW is replayed.
        """
        from unittest import mock

        from apicontainer.stashes import _filesystem as filesystemModule

        stash = FilesystemStash("files", Path(self.mktemp()), inline)
        self.successResultOf(stash.start())
        with mock.patch.object(filesystemModule, "linkTo", side_effect=OSError("killed")):
            self.assertEqual(self.successResultOf(stash.stash(uow(1, body=b"one"))).status, 503)
        self.flushLoggedErrors()
        self.assertIsNone(self.successResultOf(stash.read("/items/1")))
        verdict = self.successResultOf(stash.stash(uow(1, body=b"one")))
        self.assertEqual(verdict.kind, VerdictKind.stored)
        self.assertEqual(self.successResultOf(stash.read("/items/1")).body, b"one")

    def test_httpForwardsAgain(self) -> None:
        """
        The http stash, stopped after recording its before-image and before
        the forward, forwards when the UOW is replayed.
        """
        from treq.testing import StubTreq

        from tests.downstream import Downstream

        downstream = Downstream()
        stash = HTTPStash("api", "http://d.test", Path(self.mktemp()) / "u.sqlite3", inline, http=StubTreq(downstream))
        self.successResultOf(stash.start())
        self.addCleanup(stash.stop)
        downstream.mode = "drop"
        self.successResultOf(stash.stash(uow(1, body=b"one")))
        self.flushLoggedErrors()
        downstream.mode = None
        self.assertEqual(self.successResultOf(stash.stash(uow(1, body=b"one"))).kind, VerdictKind.stored)
        self.assertEqual(downstream.documents[b"/items/1"][0], b"one")


class FileFaultTests(SynchronousTestCase):
    """
    Write and fsync errors in the filesystem stash: a 503 verdict, and the
    document as it was.
    """

    def test_ioErrorsChangeNothing(self) -> None:
        """
        EIO from the file system sync, and EIO from fsync or ENOSPC from
        write at every durable step of a write, give a 503 verdict; the
        previous version stays readable and a later write works.
        """
        import errno
        from unittest import mock

        from apicontainer.storage import _durable as durable

        stash = FilesystemStash("files", Path(self.mktemp()), inline)
        self.successResultOf(stash.start())
        self.successResultOf(stash.stash(uow(1, body=b"one")))
        self.successResultOf(stash.commit(uow(1, body=b"one")))
        nextId = 2
        from apicontainer.stashes import _filesystem as filesystemModule

        with mock.patch.object(filesystemModule, "syncFilesystem", side_effect=OSError(errno.EIO, "EIO")):
            verdict = self.successResultOf(stash.stash(uow(50, body=b"bad")))
        self.assertEqual(verdict.status, 503)
        self.successResultOf(stash.rollback(uow(50, body=b"bad")))
        self.assertEqual(self.successResultOf(stash.read("/items/1")).body, b"one")
        for target, code in (("fsync", errno.EIO), ("writev", errno.ENOSPC)):
            for failAt in range(1, 6):
                calls = {"n": 0}
                real = getattr(durable.os, target)

                def failing(*args, real=real, failAt=failAt, code=code, calls=calls):  # type: ignore[no-untyped-def]
                    calls["n"] += 1
                    if calls["n"] == failAt:
                        raise OSError(code, os.strerror(code))
                    return real(*args)

                with mock.patch.object(durable.os, target, failing):
                    verdict = self.successResultOf(stash.stash(uow(nextId, body=b"bad")))
                if verdict.kind is VerdictKind.failed:
                    self.assertEqual(verdict.status, 503)
                    self.successResultOf(stash.rollback(uow(nextId, body=b"bad")))
                    self.assertEqual(self.successResultOf(stash.read("/items/1")).body, b"one", (target, failAt))
                else:
                    self.successResultOf(stash.rollback(uow(nextId, body=b"bad")))
                nextId += 1
        self.assertEqual(self.successResultOf(stash.stash(uow(nextId, body=b"two"))).kind, VerdictKind.stored)
        self.assertEqual(self.successResultOf(stash.read("/items/1")).body, b"two")
