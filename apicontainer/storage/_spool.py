"""
The spool: every accepted request, on local disk, before anything else.

One file per UOW, C{spool/<uow id>.uow}, in the frame of
L{apicontainer.storage._spoolfile}. A file is written under a temporary
name, fsynced, renamed into place and its directory fsynced, so it is either
whole or absent. A file that fails its checks is moved to C{quarantine/} and
never replayed.

Creating a file is the costliest system call a write makes on some disks
(more than its write and its share of the sync), so a deleted spool file is
moved to C{spares/} beside the spool, emptied, and kept there, up to
L{SPARES} of them, and the next write goes through one of those instead of
a new file. A spare is emptied by writing zeros over its bytes, in place, so
that it keeps its blocks: neither its emptying nor the next write through
it frees or allocates one, which costs about a third of the CPU time of
truncating it and writing it again (a spare larger than L{ZEROED_BYTES} is
truncated instead). The journal, which removes the files of whole batches,
moves them first and empties them once it has answered and has nothing else
to do. A write takes only spares whose emptying a sync has covered (a crash
could otherwise bring the old bytes back under the new file's name), and a
start empties them all again and syncs.
"""

from __future__ import annotations

import errno
import os
from collections import deque
from pathlib import Path
from typing import Sequence

from attrs import evolve
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from zope.interface import implementer

from ..blocking import Blocking
from ..interfaces import ISpool
from ..uow import INLINE_BODY_BYTES, SpooledBody, UnitOfWork
from ._durable import (
    fsyncDirectory,
    makeDirectories,
    removeFile,
    removeTemporaries,
    syncFilesystem,
    writeAtomically,
)
from ._groupcommit import GroupCommit, Operation, Result, runEach
from ._spoolfile import SUFFIX, CorruptSpoolFile, decodeFrom, encodeHead, fileName, framed

SPARES = 256
# The largest spare emptied by writing zeros over it; a larger one (a large
# body's) is truncated rather than have all its bytes written again.
ZEROED_BYTES = 64 * 1024


def emptyFile(path: Path) -> None:
    """
    Leave none of C{path}'s bytes behind (blocking): write zeros over them,
    in place, so that the file keeps its blocks; truncate it instead if it
    is larger than L{ZEROED_BYTES} (or if a write falls short).

    @raise OSError: It could not be emptied.
    """
    fd = os.open(path, os.O_WRONLY)
    try:
        size = os.fstat(fd).st_size
        if size > ZEROED_BYTES or os.pwrite(fd, bytes(size), 0) != size:
            os.ftruncate(fd, 0)
    finally:
        os.close(fd)


class SpoolError(Exception):
    """
    The spool could not record a request; nothing was spooled.
    """


class SpoolFull(SpoolError):
    """
    The spool's disk is full; nothing was spooled. Retry later.
    """


def _spoolError(error: OSError) -> SpoolError:
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        return SpoolFull(f"spool disk full: {error.strerror}")
    return SpoolError(f"spool write failed: {error.strerror or error}")


@implementer(ISpool)
class Spool:
    """
    The durable store of accepted requests, one file per UOW.

    Every method that touches the disk runs through the C{blocking} runner.
    """

    log = Logger()

    def __init__(self, directory: Path, quarantine: Path, blocking: Blocking, spares: Path | None = None) -> None:
        """
        @param spares: Where emptied spool files are kept for reuse (on the
            spool's file system); none are kept without it.
        """
        self.directory = directory
        self.quarantineDirectory = quarantine
        self.sparesDirectory = spares
        self._blocking = blocking
        self._group = GroupCommit(blocking, self.runWrites)
        self._deletions = GroupCommit(blocking, runEach)
        # Taken by writes and given back by deletions, which may run in
        # different threads: a deque's append and popleft are atomic.
        self._spares: deque[Path] = deque()
        # Emptied, but no sync has covered it yet: no write takes it.
        self._emptied: deque[Path] = deque()
        # Moved out of the spool by a removal, not emptied yet (emptySpare).
        self._unemptied: deque[Path] = deque()

    def open(self, clean: bool = True) -> None:
        """
        Create the spool and quarantine directories (blocking; at start-up).

        @param clean: Remove the temporary files of writes that a crash cut
            short: only for the spool's first user, before any write starts.
        """
        makeDirectories(self.directory)
        makeDirectories(self.quarantineDirectory)
        if clean:
            removeTemporaries(self.directory)
        if self.sparesDirectory is not None:
            makeDirectories(self.sparesDirectory)
            self._spares = deque()
            for entry in os.scandir(self.sparesDirectory):
                self._empty(Path(entry.path))  # a crash may have left a request's bytes in it
            if self._emptied:
                syncFilesystem(self.sparesDirectory)
                self._synced(len(self._emptied))

    def path(self, uowId: int) -> Path:
        """
        The spool file of UOW C{uowId}.
        """
        return self.directory / fileName(uowId)

    def write(self, uow: UnitOfWork) -> Deferred[UnitOfWork]:
        """
        Record C{uow} durably.

        Writes that arrive together share one thread-pool hop and one
        C{syncfs} (group commit): every file is written and renamed into
        place, then the file system is synced once for all of them, before
        any of them is acknowledged. A large body is copied a chunk at a
        time from where it lies.

        @return: A Deferred that fires once the file and its directory entry
            are fsynced, with the UOW as spooled (a large body now refers to
            the spool file), or fails with L{SpoolFull} or L{SpoolError}, in
            which case no spool file exists.
        """
        return self._group.submit(self.writeNow, uow)

    def writeNow(self, uow: UnitOfWork) -> UnitOfWork:
        path = self.path(uow.id)
        head = encodeHead(uow)
        # Writes take spares one batch at a time, and deletions only give
        # them back: one that is here now is still here on the next line.
        spare = self._spares.popleft() if self._spares else None
        try:
            try:
                writeAtomically(path, framed(head, uow), sync=False, temporary=spare)
            except FileNotFoundError:
                if spare is None:
                    raise
                # The spare, or its folder, went: a new file instead.
                writeAtomically(path, framed(head, uow), sync=False)
        except OSError as e:
            raise _spoolError(e) from e
        if uow.bodyLength <= INLINE_BODY_BYTES:
            return uow
        return evolve(uow, body=SpooledBody(path, len(head), uow.bodyLength))

    def runWrites(self, operations: Sequence[Operation]) -> list[Result]:
        outcomes = runEach(operations)
        written = [self.path(uow.id) for ok, uow in outcomes if ok]
        if written:
            emptied = len(self._emptied)
            try:
                syncFilesystem(self.directory)
            except OSError as e:
                # Not durable, so not trusted: the requests are refused and
                # their files must not be replayed.
                for path in written:
                    try:
                        os.unlink(path)
                    except OSError:
                        pass
                raise _spoolError(e) from e
            self._synced(emptied)
        return outcomes

    def _synced(self, count: int) -> None:
        """
        Let writes take the C{count} spares emptied first: a sync has
        covered their emptying.
        """
        for _ in range(count):
            self._spares.append(self._emptied.popleft())

    def load(self, uowId: int) -> Deferred[UnitOfWork]:
        """
        Read the UOW back from its spool file.

        @return: A Deferred that fires with the L{UnitOfWork}, or fails with
            L{CorruptSpoolFile} or L{FileNotFoundError}.
        """
        return self._blocking(self._load, uowId)

    def _load(self, uowId: int) -> UnitOfWork:
        path = self.path(uowId)
        with open(path, "rb") as f:
            uow = decodeFrom(f, os.fstat(f.fileno()).st_size, path)
        if uow.id != uowId:
            raise CorruptSpoolFile(f"file of UOW {uowId} holds UOW {uow.id}")
        return uow

    def delete(self, uowId: int) -> Deferred[bool]:
        """
        Remove the spool file of UOW C{uowId}, once its final state is
        recorded. The removal is not fsynced: a file that a crash brings back
        has a final state, and recovery removes it again.

        Deletions that arrive together share one thread-pool hop. The file
        is emptied and kept for reuse while there are fewer than L{SPARES}.

        @return: A Deferred that fires with whether there was a file.
        """
        return self._deletions.submit(self.remove, uowId)

    def remove(self, uowId: int, empty: bool = True) -> bool:
        """
        L{delete}'s blocking call, for a caller already in a thread.

        @param empty: Whether to empty the file now. If not, it is out of
            the spool but keeps its bytes, and no write takes it, until
            L{emptySpare} has emptied it (and a write's sync has covered
            that, as for every spare).
        """
        path = self.path(uowId)
        if self.sparesDirectory is None or len(self._spares) + len(self._emptied) + len(self._unemptied) >= SPARES:
            return removeFile(path)
        spare = self.sparesDirectory / str(uowId)  # ids are never reused
        try:
            os.rename(path, spare)
        except OSError:
            # It is gone; or the spares folder is, or is on another file system.
            return removeFile(path)
        if empty:
            self._empty(spare)
        else:
            self._unemptied.append(spare)
        return True

    def emptySpare(self) -> bool:
        """
        Empty the oldest file that L{remove} left holding its bytes, and let
        writes take it (blocking).

        @return: Whether there was one.
        """
        try:
            spare = self._unemptied.popleft()
        except IndexError:
            return False
        self._empty(spare)
        return True

    def _empty(self, spare: Path) -> None:
        try:
            emptyFile(spare)
        except OSError:
            removeFile(spare)
            return
        self._emptied.append(spare)

    def quarantine(self, uowId: int) -> Deferred[Path]:
        """
        Move the spool file of UOW C{uowId} out of the way, for an operator
        to inspect; it is never replayed.

        @return: A Deferred that fires with the file's new path.
        """
        return self._blocking(self._quarantine, uowId)

    def _quarantine(self, uowId: int) -> Path:
        source = self.path(uowId)
        target = self.quarantineDirectory / source.name
        os.rename(source, target)
        fsyncDirectory(self.directory)
        fsyncDirectory(self.quarantineDirectory)
        self.log.error(
            "spool file of UOW {uow} is corrupt; moved to {target}",
            uow=uowId,
            target=str(target),
        )
        return target

    def scan(self) -> Deferred[list[int]]:
        """
        The UOW ids that have a spool file, in ascending order.
        """
        return self._blocking(self.pending)

    def pending(self) -> list[int]:
        """
        The UOW ids that have a spool file, in ascending order (blocking).
        """
        ids = []
        for entry in os.scandir(self.directory):
            stem, dot, suffix = entry.name.partition(".")
            if dot and "." + suffix == SUFFIX and stem.isdigit():
                ids.append(int(stem))
        return sorted(ids)
