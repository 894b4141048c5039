"""
The C{filesystem} stash: each document a plain file under C{root}.

Layout, for the key C{/items/42}::

    root/items/42.doc          the current version (a hard link to it): cat it
    root/items/42.v17          the body written by UOW 17; in extended
                               attributes, user.uow names its write ("v17",
                               "d17" for a deletion's empty version) and
                               user.content_type holds its content type,
                               when it had one
    root/.undo/batch-9.jsonl   the undo records (before-images) of the UOWs
                               of one batch, a JSON line each, until each of
                               them commits or rolls back
    root/.rolledback/17        marker: UOW 17 was rolled back
    root/.spares/...           empty files made while the stash is idle, each
                               taken (renamed) by a later version or journal

Where the file system takes no user extended attributes, C{42.doc} is a
symlink to the version instead, and the content type is in the file
C{42.v17.type} beside it; a deletion writes no version, and its symlink
points at a C{.d17} name that does not exist. Either form is read wherever
it is found. The hard link exists because creating a file (or a symlink) is
the costliest system call a write makes here, and a link creates none. For
the same reason the stash's process makes empty files in C{.spares/} while
no call waits (L{FilesystemStash.prepareSpare}), up to L{SPARES}, and a
version or a journal takes one of those, renamed into place, instead of a
new file; with none left, it creates its file as before.

Each key segment is percent-encoded (every byte but letters, digits, C{-}
and C{_}), so a segment is never C{.} or C{..}, never contains C{/}, and
never collides with the C{.doc}/C{.v} names; an over-long segment is replaced
by a hash. No key can name a path outside C{root}.

A write lands by writing the new version and the undo record, making them
durable, then atomically replacing C{.doc} (a link made under a temporary
name, renamed over it). Writes of concurrent
UOWs go in batches (group commit): one C{syncfs} makes the versions and undo
records of a batch durable, and with them the pointer swaps of the batches
before it. A batch writes its undo records to one journal file: creating a
file is the costliest system call a write makes, so a batch creates one for
its records, not one per record. A journal goes when the last of its
records does; until then a rolled-back record stays in it, and its
rolled-back marker keeps it from counting after a restart.

A swap is durable before its UOW commits: a commit whose swap no C{syncfs}
has covered yet waits for its batch's (one serves the whole batch). Until
then a crash may undo the swap, which is harmless: the UOW is not committed,
so recovery stores it again and the undo record completes the write.
Versions and journals are written in place, not renamed into place: nothing
refers to them before the C{syncfs} that makes them whole, and an undo
record torn by a crash belongs to a write that never swapped its pointer.
A deleted document holds a
C{.d<uow>} version, so that an older UOW can never bring it back.

In the server the stash runs in a child process of its own
(L{apicontainer.stashes.fsprocess}); this class is what runs there.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence
from urllib.parse import quote

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorProcess
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from ..blocking import Blocking
from ..groupcommit import GroupCommit, Operation, Result
from ..durable import (
    fsyncDirectory,
    makeDirectories,
    removeDurably,
    removeFile,
    removeTemporaries,
    syncFilesystem,
    writeAtomically,
    writeFile,
)
from ..interfaces import ILocalStorage, IProbe, IPrunable, IReader, IStartable, IStash
from ..uow import Document, UnitOfWork, Verdict
from . import StashContext, unavailable

if TYPE_CHECKING:
    from ..config import StashSpec
    from .fsprocess import FilesystemProcessStash

_SAFE = "-_"
_CONTENT_TYPE = "user.content_type"
# Short, so that it fits in the inode beside a content type (on ext4): a
# value that does not costs a block of its own.
_UOW = "user.uow"
_JOURNAL = re.compile(r"^batch-(?P<seq>[0-9]+)\.jsonl$")
_MAX_SEGMENT = 120
SPARES = 64
_TARGET = re.compile(r"^(?P<stem>[A-Za-z0-9%_~-]+)\.(?P<kind>[vd])(?P<uow>[0-9]+)$")


def _replace(create: Callable[[], None], path: Path) -> None:
    """
    Run C{create}, which makes the name C{path}, replacing what a crash left
    there.
    """
    try:
        create()
    except FileExistsError:
        os.unlink(path)
        create()


def _symlink(target: str, path: Path) -> None:
    """
    Create the symlink C{path} to C{target}, replacing one that a crash
    left there.
    """
    _replace(lambda: os.symlink(target, path), path)


def currentVersion(pointer: Path) -> str | None:
    """
    The name of the version that the document C{pointer} (a C{.doc} path)
    holds, in either form; L{None} if it has none.
    """
    try:
        return os.readlink(pointer)
    except FileNotFoundError:
        return None
    except OSError as e:
        if e.errno != errno.EINVAL:
            raise
    return f"{pointer.name[: -len('.doc')]}.{os.getxattr(pointer, _UOW).decode('ascii')}"


def _ownName(target: str) -> bytes:
    """
    What a version C{target} holds in C{user.uow}: C{v17} for C{42.v17}.
    """
    return target.rsplit(".", 1)[1].encode("ascii")


def _takesAttributes(directory: Path) -> bool:
    """
    Whether files in C{directory} take user extended attributes.
    """
    probe = directory / ".tmp-attributes"
    try:
        writeFile(probe, [], {_UOW: b"v0"})
    except OSError as e:
        if e.errno not in (errno.ENOTSUP, errno.EOPNOTSUPP):
            raise
        return False
    removeFile(probe)
    return True


def _journalLine(uowId: int, undo: dict) -> bytes:  # type: ignore[type-arg]
    return json.dumps({"uow": uowId, **undo}).encode() + b"\n"


def _readJournal(path: Path) -> list[tuple[int, dict]]:  # type: ignore[type-arg]
    """
    The whole undo records of a journal, in order; a line torn by a crash
    (its batch never synced, so its pointer never swapped) is left out.
    """
    records = []
    for line in path.read_bytes().splitlines():
        try:
            record = json.loads(line)
            uowId = record.pop("uow")
            if isinstance(uowId, int) and set(record) == {"key", "attempt", "before", "target"}:
                records.append((uowId, record))
        except (ValueError, AttributeError, KeyError, TypeError):
            continue
    return records


def encodeSegment(segment: str) -> str:
    """
    A key segment as a file name that is always safe and never special.
    """
    encoded = quote(segment, safe=_SAFE).replace(".", "%2E").replace("~", "%7E")
    if not encoded or len(encoded) > _MAX_SEGMENT:
        return "~" + hashlib.sha256(segment.encode("utf-8", "surrogatepass")).hexdigest()
    return encoded


class LocalRoot:
    """
    What a filesystem stash, in the server or in a child process, keeps on
    this machine's disk (L{ILocalStorage}): everything under C{root}.
    """

    root: Path

    @property
    def location(self) -> Path:
        return self.root

    @property
    def files(self) -> tuple[Path, ...]:
        return ()

    def bytesFor(self, size: int) -> int:
        # The new version's file beside the one it replaces, and the undo
        # record and directory entries beside them.
        return size + 64 * 1024


@implementer(IStash, IReader, IStartable, IProbe, ILocalStorage, IPrunable)
class FilesystemStash(LocalRoot):
    """
    Documents as files under a root directory.

    """

    log = Logger()

    def __init__(self, name: str, root: Path, blocking: Blocking) -> None:
        self.name = name
        self.root = root
        self._blocking = blocking
        self._undo = root / ".undo"
        self._rolledBack = root / ".rolledback"
        self._sparesDirectory = root / ".spares"
        self._spares: list[Path] = []
        self._group = GroupCommit(blocking, self.runBatch)
        self._swaps: list[tuple[Path, str, bool, int, int]] = []
        self._commits: list[tuple[UnitOfWork, int]] = []
        self._pendingUOWs: set[int] = set()
        self._pendingPointers: set[Path] = set()
        self._outcomes: list[Result] = []
        # Syncs done so far, and for each UOW whose pointer was swapped, how
        # many had been done when it was: a later one made the swap durable.
        self._syncs = 0
        self._swappedAt: dict[int, int] = {}
        # What the .undo and .rolledback folders hold, read at start and kept
        # in step with every change, so that a write does not probe the disk
        # for them (each probe is a system call, and each system call of this
        # thread waits for the GIL afterwards); and the folders known to exist.
        self._undos: dict[int, dict] = {}  # type: ignore[type-arg]
        self._rolledBackAttempts: dict[int, int] = {}
        # Which journal holds each undo record, and which live records each
        # journal holds;
        # the records of this batch not yet in its journal; the number of
        # the last journal.
        self._homes: dict[int, Path] = {}
        self._tenants: dict[Path, set[int]] = {}
        self._unwritten: list[int] = []
        self._journals = 0
        self._directories: set[Path] = set()
        # Whether the file system takes user extended attributes (for the
        # content type and the version's name): probed at start, and
        # dropped if it ever says otherwise.
        self._attributes = True

    @classmethod
    def fromConfig(cls, spec: StashSpec, context: StashContext) -> FilesystemStash | FilesystemProcessStash:
        """
        Build the stash from its options: C{root} (relative to the data
        directory) and C{process}: whether to run it in a child process of
        its own (L{FilesystemProcessStash}); by default, where the context's
        reactor can start one (in the server, not in unit tests).
        """
        root = context.path(spec.options.string("root"))
        if spec.options.boolean("process", IReactorProcess.providedBy(context.reactor)):
            from .fsprocess import FilesystemProcessStash

            return FilesystemProcessStash(spec.name, root, context.reactor)
        return cls(spec.name, root, context.blocking)

    def start(self) -> Deferred[None]:
        return self._blocking(self.openNow)

    def _sweepTemporaries(self) -> int:
        """
        Remove the C{.tmp-*} names that pointer swaps cut short by a crash
        left beside the documents (blocking; at start). None was renamed
        into place, so none is a document; no encoded segment starts with a
        dot, so none is mistaken for one.

        @return: How many were removed.
        """
        removed = 0
        internal = {self._undo.name, self._rolledBack.name, self._sparesDirectory.name}
        for directory, subdirectories, names in os.walk(self.root):
            if directory == str(self.root):
                subdirectories[:] = [d for d in subdirectories if d not in internal]
            stale = [name for name in names if name.startswith(".tmp-")]
            for name in stale:
                removed += removeFile(Path(directory, name))
            if stale:
                fsyncDirectory(Path(directory))
        return removed

    def openNow(self) -> None:
        makeDirectories(self._undo)
        makeDirectories(self._rolledBack)
        removeTemporaries(self._undo)
        removeTemporaries(self._rolledBack)
        swept = self._sweepTemporaries()
        if swept:
            self.log.info("stash {stash}: removed {count} temporary file(s) a crash left", stash=self.name, count=swept)
        self._attributes = _takesAttributes(self._undo)
        self._spares = []
        try:
            entries = list(os.scandir(self._sparesDirectory))
        except FileNotFoundError:
            entries = []
        for entry in entries:
            if entry.stat().st_size:
                removeFile(Path(entry.path))  # not one of ours: a spare is always empty
            else:
                self._spares.append(Path(entry.path))
        self._rolledBackAttempts = {
            int(path.name): int(path.read_text("ascii"))
            for path in self._rolledBack.iterdir()
            if path.name.isdigit()
        }
        self._undos, self._homes, self._tenants = {}, {}, {}
        journals = []
        for path in self._undo.iterdir():
            match = _JOURNAL.match(path.name)
            if match is not None:
                journals.append((int(match["seq"]), path))
        for _, path in sorted(journals):  # a later record of a UOW replaces an earlier one
            self._tenants.setdefault(path, set())
            for uowId, undo in _readJournal(path):
                self._settle(uowId, undo, path)
        self._journals = max((seq for seq, _ in journals), default=0)
        for uowId, undo in list(self._undos.items()):
            if self._rolledBackAttempt(uowId) >= undo["attempt"]:
                self._forget(uowId, durably=False)  # rolled back: it stayed in its journal
        for path, tenants in list(self._tenants.items()):
            if not tenants:
                del self._tenants[path]
                removeFile(path)
        # Whatever an earlier process swapped is durable before this one
        # commits anything.
        syncFilesystem(self.root)

    def stop(self) -> Deferred[None]:
        return succeed(None)

    def probe(self) -> Deferred[None]:
        return self._blocking(self.checkNow)

    def checkNow(self) -> None:
        if not self._undo.is_dir() or not os.access(self._undo, os.W_OK):
            raise OSError(f"{self.root} is not a writable directory with its .undo folder")

    def _pointer(self, key: str) -> Path:
        segments = [encodeSegment(s) for s in key.strip("/").split("/")]
        *directories, leaf = segments
        return self.root.joinpath(*directories, leaf + ".doc")

    def _current(self, pointer: Path) -> tuple[str, int] | None:
        """
        The name of the version the pointer holds and the UOW that wrote it.
        """
        target = currentVersion(pointer)
        if target is None:
            return None
        match = _TARGET.match(target)
        if match is None:
            raise OSError(f"{pointer} points at {target!r}, which is not a version")
        return target, int(match["uow"])

    def _readUndo(self, uowId: int) -> dict | None:  # type: ignore[type-arg]
        return self._undos.get(uowId)

    def _writeUndo(self, uowId: int, undo: dict, sync: bool) -> None:  # type: ignore[type-arg]
        """
        Record C{undo}. With C{sync} it goes durably to a journal of its
        own, which replaces the record it had; otherwise it goes to the
        batch's journal, which the batch's sync makes durable.
        """
        if not sync:
            self._undos[uowId] = undo
            self._unwritten.append(uowId)
            return
        path = self._nextJournal()
        writeAtomically(path, [_journalLine(uowId, undo)])
        self._settle(uowId, undo, path)

    def _nextJournal(self) -> Path:
        self._journals += 1
        return self._undo / f"batch-{self._journals}.jsonl"

    def _writeJournal(self) -> None:
        """
        Write the batch's undo records to a journal of their own (not yet
        durably).
        """
        uowIds, self._unwritten = self._unwritten, []
        if not uowIds:
            return
        path = self._nextJournal()
        lines = b"".join(_journalLine(uowId, self._undos[uowId]) for uowId in uowIds)
        writeFile(path, [lines], empty=self._fromSpare(path))
        for uowId in uowIds:
            self._settle(uowId, self._undos[uowId], path)

    def _settle(self, uowId: int, undo: dict, path: Path) -> None:  # type: ignore[type-arg]
        """
        Note that C{path} holds C{undo}, the live record of UOW C{uowId}.
        """
        previous = self._homes.get(uowId)
        if previous is not None and previous != path:
            self._leave(uowId, previous, durably=False)
        self._undos[uowId], self._homes[uowId] = undo, path
        self._tenants.setdefault(path, set()).add(uowId)

    def _forget(self, uowId: int, durably: bool) -> None:
        """
        Drop the undo record of UOW C{uowId}: its file goes when it holds no
        other live record (durably if asked).
        """
        del self._undos[uowId]
        home = self._homes.pop(uowId, None)
        if home is not None:
            self._leave(uowId, home, durably)

    def _leave(self, uowId: int, home: Path, durably: bool) -> None:
        tenants = self._tenants[home]
        tenants.discard(uowId)
        if not tenants:
            del self._tenants[home]
            if durably:
                removeDurably(home)
            else:
                removeFile(home)

    def _rolledBackAttempt(self, uowId: int) -> int:
        return self._rolledBackAttempts.get(uowId, 0)

    def _ensureDirectory(self, directory: Path) -> None:
        if directory not in self._directories:
            makeDirectories(directory)
            self._directories.add(directory)

    def stash(self, uow: UnitOfWork) -> Deferred[Verdict]:
        return self._group.submit(self.stashNow, uow).addErrback(unavailable(self, uow, OSError))

    def runBatch(self, operations: Sequence[Operation]) -> list[Result]:
        """
        Run a batch: a stash's pointer swap, and a commit that must wait for
        a sync, wait for the end of the batch, so that one journal and one
        syncfs serve them all. An operation on a UOW or key with one of
        those pending (never one from the fanout, which runs one UOW per
        key at a time) first has them done, so that it sees them.
        """
        self._outcomes = []
        try:
            for function, args in operations:
                uow = args[0]
                if self._pendingUOWs and (
                    not isinstance(uow, UnitOfWork)  # a prune: after what is pending
                    or uow.id in self._pendingUOWs
                    or self._pointer(uow.key) in self._pendingPointers
                ):
                    self._flush()
                try:
                    self._outcomes.append((True, function(*args)))
                except Exception:
                    # A folder may have gone: look again next time.
                    self._directories.clear()
                    self._outcomes.append((False, Failure()))
            self._flush()
            return self._outcomes
        finally:
            self._swaps, self._commits, self._outcomes, self._unwritten = [], [], [], []
            self._pendingUOWs, self._pendingPointers = set(), set()

    def _flush(self) -> None:
        """
        Write the pending undo records to the batch's journal, make it and
        the pending versions durable (one syncfs for all, which also makes
        the earlier swaps durable), swap the pending pointers, and finish the
        commits that waited for a sync.
        """
        swaps, self._swaps = self._swaps, []
        commits, self._commits = self._commits, []
        self._pendingUOWs, self._pendingPointers = set(), set()
        if not swaps and not commits:
            return
        try:
            self._writeJournal()
            self._sync()
            for pointer, target, linked, uowId, _ in swaps:
                self._link(pointer, target, linked)
                self._swappedAt[uowId] = self._syncs
        except OSError:
            failure = Failure()
            for *_, index in swaps + commits:  # type: ignore[operator]
                self._outcomes[index] = (False, failure)
            return
        for uow, index in commits:
            try:
                self._finishCommit(uow)
            except Exception:
                self._outcomes[index] = (False, Failure())

    def _sync(self) -> None:
        syncFilesystem(self.root)
        self._syncs += 1

    def _later(self, uow: UnitOfWork, pointer: Path) -> int:
        self._pendingUOWs.add(uow.id)
        self._pendingPointers.add(pointer)
        return len(self._outcomes)

    def _swapLater(self, pointer: Path, target: str, linked: bool, uow: UnitOfWork) -> None:
        self._swaps.append((pointer, target, linked, uow.id, self._later(uow, pointer)))

    def stashNow(self, uow: UnitOfWork) -> Verdict:
        if self._rolledBackAttempt(uow.id) >= uow.attempt:
            return Verdict.declined("rolled back before it arrived")
        pointer = self._pointer(uow.key)
        current = self._current(pointer)
        undo = self._readUndo(uow.id)
        if undo is not None:
            if current is not None and current[0] == undo["target"]:
                return Verdict.stored(detail="already stored")
            if current is None or current[1] < uow.id:
                # A crash came between recording the undo and swapping the
                # pointer: finish the write.
                linked = self._writeVersion(pointer, undo["target"], uow)
                self._swapLater(pointer, undo["target"], linked, uow)
                return Verdict.stored(detail="completed after a crash")
            return Verdict.stored(detail="already stored")
        if current is not None and current[1] >= uow.id:
            if current[1] == uow.id:
                return Verdict.stored(detail="already stored")
            return Verdict.declined(f"superseded by UOW {current[1]}")
        stem = pointer.name[: -len(".doc")]
        target = f"{stem}.{'d' if uow.isDelete else 'v'}{uow.id}"
        linked = self._writeVersion(pointer, target, uow)
        self._ensureDirectory(self._undo)  # brings the stash back after its root was restored
        undo = {
            "key": uow.key,
            "attempt": uow.attempt,
            "before": current[0] if current else None,
            "target": target,
        }
        self._writeUndo(uow.id, undo, sync=False)
        self._swapLater(pointer, target, linked, uow)
        return Verdict.stored(status=200)

    def prepareSpare(self) -> bool:
        """
        Make one empty file in C{.spares/} for a later version or journal
        to take, if fewer than L{SPARES} wait there (blocking; the stash's
        process calls it while no call waits).

        @return: Whether it made one.
        """
        if len(self._spares) >= SPARES:
            return False
        path = self._sparesDirectory / os.urandom(8).hex()
        try:
            self._ensureDirectory(self._sparesDirectory)
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640))
        except OSError:
            self._directories.discard(self._sparesDirectory)
            return False
        self._spares.append(path)
        return True

    def _fromSpare(self, path: Path) -> bool:
        """
        Give C{path} the inode of a spare, if one waits, so that writing it
        creates no file (a write that finds none creates its file).

        @return: Whether C{path} is now an empty spare.
        """
        if self._spares:
            try:
                os.rename(self._spares.pop(), path)
                return True
            except OSError:
                pass
        return False

    def _writeVersion(self, pointer: Path, target: str, uow: UnitOfWork) -> bool:
        """
        Write C{uow}'s body as the version file C{target} beside C{pointer}
        (a deletion's C{.d} version is empty); the batch's sync makes it
        durable. A large body is copied from the spool a chunk at a time.

        @return: Whether the version names itself in C{user.uow}, so that
            the document can be a hard link to it; if not (no extended
            attributes here), a deletion writes no file.
        """
        self._ensureDirectory(pointer.parent)
        version = pointer.with_name(target)
        deletion = _TARGET.match(target)["kind"] == "d"  # type: ignore[index]
        contentType = None if deletion else uow.contentType
        if self._attributes:
            attributes = {_UOW: _ownName(target)}
            if contentType:
                attributes[_CONTENT_TYPE] = contentType.encode("utf-8")
            try:
                empty = self._fromSpare(version)
                writeFile(version, [] if deletion else uow.bodyChunks(), attributes, empty)
                return True
            except OSError as e:
                if e.errno not in (errno.ENOTSUP, errno.EOPNOTSUPP):
                    raise
                self._attributes = False
        if deletion:
            return False
        writeFile(version, uow.bodyChunks(), empty=self._fromSpare(version))
        if contentType:
            writeFile(version.with_name(target + ".type"), [contentType.encode("utf-8")])
        return False

    def _point(self, pointer: Path, target: str | None) -> None:
        """
        Make C{pointer} link to C{target} (remove it for L{None}), atomically
        and durably.
        """
        if target is None:
            removeDurably(pointer)
            return
        try:
            linked = os.getxattr(pointer.with_name(target), _UOW) == _ownName(target)
        except OSError:
            linked = False  # a version, or a deletion, without its name
        self._link(pointer, target, linked)
        fsyncDirectory(pointer.parent)

    def _link(self, pointer: Path, target: str, linked: bool) -> None:
        """
        Make C{pointer} a hard link to the version C{target} (a symlink to
        it, unless C{linked}), atomically (not yet durably).
        """
        temporary = pointer.with_name(f".tmp-{pointer.name}")
        if linked:
            _replace(lambda: os.link(pointer.with_name(target), temporary), temporary)
        else:
            _symlink(target, temporary)
        os.rename(temporary, pointer)

    def _removeVersion(self, directory: Path, target: str | None) -> None:
        if target is None:
            return
        for name in (target, target + ".type"):
            removeFile(directory / name)

    def rollback(self, uow: UnitOfWork) -> Deferred[None]:
        return self._group.submit(self.rollbackNow, uow)

    def rollbackNow(self, uow: UnitOfWork) -> None:
        self._swappedAt.pop(uow.id, None)
        undo = self._readUndo(uow.id)
        if undo is not None:
            pointer = self._pointer(undo["key"])
            current = self._current(pointer)
            if current is not None and current[0] == undo["target"]:
                self._point(pointer, undo["before"])
            else:
                self._handOver(undo)
            self._removeVersion(pointer.parent, undo["target"])
        attempt = max(self._rolledBackAttempt(uow.id), uow.attempt)
        self._ensureDirectory(self._rolledBack)
        writeAtomically(self._rolledBack / str(uow.id), [b"%d" % (attempt,)])
        self._rolledBackAttempts[uow.id] = attempt
        if undo is not None:
            self._forget(uow.id, durably=True)

    def _handOver(self, undo: dict) -> None:  # type: ignore[type-arg]
        """
        A later UOW wrote over the one being rolled back: keep its write,
        and make its own rollback restore our before-image, not our write.
        """
        for uowId, later in list(self._undos.items()):
            if later["key"] == undo["key"] and later["before"] == undo["target"]:
                self._writeUndo(uowId, dict(later, before=undo["before"]), sync=True)

    def prune(self, horizon: int) -> Deferred[int]:
        return self._group.submit(self.pruneNow, horizon)

    def pruneNow(self, horizon: int) -> int:
        old = [uowId for uowId, attempt in self._rolledBackAttempts.items() if attempt < horizon]
        for uowId in old:
            removeFile(self._rolledBack / str(uowId))
            del self._rolledBackAttempts[uowId]
        return len(old)

    def commit(self, uow: UnitOfWork) -> Deferred[None]:
        return self._group.submit(self.commitNow, uow)

    def commitNow(self, uow: UnitOfWork) -> None:
        # The write must be durable before its undo record goes: when no
        # sync has covered its swap yet, the commit waits for the batch's.
        # Nothing else here needs a sync: an undo record or old version that
        # a crash brings back is only clutter (a replay finds the write in
        # place, and no rollback is sent after a commit).
        if self._swappedAt.get(uow.id) == self._syncs:
            self._commits.append((uow, self._later(uow, self._pointer(uow.key))))
            return
        self._finishCommit(uow)

    def _finishCommit(self, uow: UnitOfWork) -> None:
        self._swappedAt.pop(uow.id, None)
        if self._rolledBackAttempts.pop(uow.id, None) is not None:
            removeFile(self._rolledBack / str(uow.id))
        undo = self._readUndo(uow.id)
        if undo is None:
            return
        if undo["before"] is not None:
            pointer = self._pointer(undo["key"])
            current = self._current(pointer)
            if current is None or current[0] != undo["before"]:
                self._removeVersion(pointer.parent, undo["before"])
        self._forget(uow.id, durably=False)

    def read(self, key: str) -> Deferred[Document | None]:
        return self._blocking(self.readNow, key)

    def readNow(self, key: str) -> Document | None:
        pointer = self._pointer(key)
        current = self._current(pointer)
        if current is None or _TARGET.match(current[0])["kind"] == "d":  # type: ignore[index]
            return None
        version = pointer.with_name(current[0])
        contentType: str | None
        try:
            contentType = os.getxattr(version, _CONTENT_TYPE).decode("utf-8")
        except OSError:
            try:
                contentType = version.with_name(current[0] + ".type").read_text("utf-8")
            except FileNotFoundError:
                contentType = None
        return Document(version.read_bytes(), contentType, current[1])
