"""
The C{filesystem} stash: each document a plain file under C{root}, laid
out as L{apicontainer.stashes._fslayout} says, with its undo records and
rollback markers in L{apicontainer.stashes._fsundo}.

A write lands by writing the new version and the undo record, making them
durable, then atomically replacing C{.doc} (a link made under a temporary
name, renamed over it). Writes of concurrent UOWs go in batches (group
commit): one C{syncfs} makes the versions and undo records of a batch
durable, and with them the pointer swaps of the batches before it.

A swap is durable before its UOW commits: a commit whose swap no C{syncfs}
has covered yet waits for its batch's (one serves the whole batch). Until
then a crash may undo the swap, which is harmless: the UOW is not committed,
so recovery stores it again and the undo record completes the write.
Versions and journals are written in place, not renamed into place: nothing
refers to them before the C{syncfs} that makes them whole, and an undo
record torn by a crash belongs to a write that never swapped its pointer.
A deleted document holds a C{.d<uow>} version, so that an older UOW can
never bring it back.

The hard link and the spare files (L{Spares}) exist because creating a
file is the costliest system call a write makes here: a link creates none,
and a spare was created while the stash was idle.

In the server the stash runs in a child process of its own
(L{apicontainer.stashes._fsprocess}); this class is what runs there.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorProcess
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from ..blocking import Blocking
from ..interfaces import ILocalStorage, IProbe, IPrunable, IReader, IStartable, IStash
from ..storage import (
    GroupCommit,
    Operation,
    Result,
    fsyncDirectory,
    makeDirectories,
    removeFile,
    syncFilesystem,
    writeFile,
)
from ..uow import Document, UnitOfWork, Verdict
from ._context import StashContext, unavailable
from ._fslayout import (
    CONTENT_TYPE_ATTRIBUTE,
    UOW_ATTRIBUTE,
    VERSION_NAME,
    LocalRoot,
    Spares,
    currentVersion,
    encodeSegment,
    linkTo,
    ownName,
    pointTo,
    readVersion,
    removeVersion,
    takesAttributes,
)
from ._fsundo import UndoLog

if TYPE_CHECKING:
    from ..config import StashSpec
    from ._fsprocess import FilesystemProcessStash

SPARES = 64


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
        self._spares = Spares(root / ".spares", SPARES)
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
        # The folders known to exist, so that a write does not probe the
        # disk for them (each probe is a system call, and each system call
        # of this thread waits for the GIL afterwards).
        self._directories: set[Path] = set()
        self._undo = UndoLog(root, self._ensureDirectory, self._spares.take)
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
            from ._fsprocess import FilesystemProcessStash

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
        internal = {self._undo.directory.name, self._undo.markers.name, self._spares.directory.name}
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
        self._undo.open()
        swept = self._sweepTemporaries()
        if swept:
            self.log.info("stash {stash}: removed {count} temporary file(s) a crash left", stash=self.name, count=swept)
        self._attributes = takesAttributes(self._undo.directory)
        self._spares.open()
        # Whatever an earlier process swapped is durable before this one
        # commits anything.
        syncFilesystem(self.root)

    def stop(self) -> Deferred[None]:
        return succeed(None)

    def probe(self) -> Deferred[None]:
        return self._blocking(self.checkNow)

    def checkNow(self) -> None:
        if not self._undo.directory.is_dir() or not os.access(self._undo.directory, os.W_OK):
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
        match = VERSION_NAME.match(target)
        if match is None:
            raise OSError(f"{pointer} points at {target!r}, which is not a version")
        return target, int(match["uow"])

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
            self._swaps, self._commits, self._outcomes = [], [], []
            self._undo.endBatch()
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
            self._undo.writeBatch()
            self._sync()
            for pointer, target, linked, uowId, _ in swaps:
                linkTo(pointer, target, linked)
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
        if self._undo.rolledBackAttempt(uow.id) >= uow.attempt:
            return Verdict.declined("rolled back before it arrived")
        pointer = self._pointer(uow.key)
        current = self._current(pointer)
        undo = self._undo.get(uow.id)
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
        undo = {
            "key": uow.key,
            "attempt": uow.attempt,
            "before": current[0] if current else None,
            "target": target,
        }
        self._undo.write(uow.id, undo, sync=False)
        self._swapLater(pointer, target, linked, uow)
        return Verdict.stored(status=200)

    def prepareSpare(self) -> bool:
        """
        Make one spare file for a later version or journal to take, if
        fewer than L{SPARES} wait (blocking; the stash's process calls it
        while no call waits).

        @return: Whether it made one.
        """
        return self._spares.prepare()

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
        deletion = VERSION_NAME.match(target)["kind"] == "d"  # type: ignore[index]
        contentType = None if deletion else uow.contentType
        if self._attributes:
            attributes = {UOW_ATTRIBUTE: ownName(target)}
            if contentType:
                attributes[CONTENT_TYPE_ATTRIBUTE] = contentType.encode("utf-8")
            try:
                empty = self._spares.take(version)
                writeFile(version, [] if deletion else uow.bodyChunks(), attributes, empty)
                return True
            except OSError as e:
                if e.errno not in (errno.ENOTSUP, errno.EOPNOTSUPP):
                    raise
                self._attributes = False
        if deletion:
            return False
        writeFile(version, uow.bodyChunks(), empty=self._spares.take(version))
        if contentType:
            writeFile(version.with_name(target + ".type"), [contentType.encode("utf-8")])
        return False

    def rollback(self, uow: UnitOfWork) -> Deferred[None]:
        return self._group.submit(self.rollbackNow, uow)

    def rollbackNow(self, uow: UnitOfWork) -> None:
        self._swappedAt.pop(uow.id, None)
        undo = self._undo.get(uow.id)
        if undo is not None:
            pointer = self._pointer(undo["key"])
            current = self._current(pointer)
            if current is not None and current[0] == undo["target"]:
                pointTo(pointer, undo["before"])
            else:
                self._handOver(undo)
            removeVersion(pointer.parent, undo["target"])
        self._undo.markRolledBack(uow.id, uow.attempt)
        if undo is not None:
            self._undo.forget(uow.id, durably=True)

    def _handOver(self, undo: dict) -> None:  # type: ignore[type-arg]
        """
        A later UOW wrote over the one being rolled back: keep its write,
        and make its own rollback restore our before-image, not our write.
        """
        for uowId, later in self._undo.items():
            if later["key"] == undo["key"] and later["before"] == undo["target"]:
                self._undo.write(uowId, dict(later, before=undo["before"]), sync=True)

    def prune(self, horizon: int) -> Deferred[int]:
        return self._group.submit(self.pruneNow, horizon)

    def pruneNow(self, horizon: int) -> int:
        return self._undo.prune(horizon)

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
        self._undo.clearRolledBack(uow.id)
        undo = self._undo.get(uow.id)
        if undo is None:
            return
        if undo["before"] is not None:
            pointer = self._pointer(undo["key"])
            current = self._current(pointer)
            if current is None or current[0] != undo["before"]:
                removeVersion(pointer.parent, undo["before"])
        self._undo.forget(uow.id, durably=False)

    def read(self, key: str) -> Deferred[Document | None]:
        return self._blocking(self.readNow, key)

    def readNow(self, key: str) -> Document | None:
        pointer = self._pointer(key)
        current = self._current(pointer)
        return None if current is None else readVersion(pointer, *current)
