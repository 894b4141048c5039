"""
UOW ids: integers, unique for the life of a data directory.

Ids are handed out in memory from a block whose upper end is recorded durably
before any id of the block is used. After a restart, numbering resumes at the
recorded end, so no id is ever handed out twice; the unused rest of a block is
skipped. One durable write serves a whole block.

The numbering itself has a name, made at random when the data directory is
first opened (L{NUMBERING}): UOW ids of two data directories are not
comparable, and a network stash uses the name to refuse writes from a second
numbering (see L{numberingOf}).
"""

from __future__ import annotations

import uuid
from pathlib import Path

from twisted.internet.defer import DeferredLock

from ..blocking import Blocking
from ._durable import writeAtomically

# The file, in the data directory, that names its UOW numbering.
NUMBERING = "numbering"


def numberingOf(dataDir: Path) -> str | None:
    """
    The name of the UOW numbering of C{dataDir} (blocking), or L{None} if
    the data directory has not been opened yet.
    """
    try:
        return (dataDir / NUMBERING).read_text("ascii").strip() or None
    except FileNotFoundError:
        return None


def nameNumbering(dataDir: Path, name: str) -> None:
    """
    Name C{dataDir}'s UOW numbering C{name} (blocking), as a shared spool
    does: its UOW ids are the stream's.
    """
    if numberingOf(dataDir) != name:
        writeAtomically(dataDir / NUMBERING, [name.encode("ascii") + b"\n"])


class UOWIds:
    """
    Hands out ascending, contiguous UOW ids.
    """

    def __init__(self, path: Path, blocking: Blocking, blockSize: int = 4096) -> None:
        self._path = path
        self._blocking = blocking
        self._blockSize = blockSize
        self._lock = DeferredLock()
        self._next = 0
        self._limit = 0

    def open(self) -> None:
        """
        Reserve the first block after the last one recorded (blocking; at
        start-up).

        @raise ValueError: The record is unreadable.
        """
        try:
            text = self._path.read_text("ascii").strip()
        except FileNotFoundError:
            start = 1
        else:
            if not text.isdigit():
                raise ValueError(f"{self._path}: not a UOW id record: {text[:40]!r}")
            start = int(text)
        numbering = self._path.with_name(NUMBERING)
        if not numbering.exists():
            writeAtomically(numbering, [uuid.uuid4().hex.encode("ascii") + b"\n"])
        self._reserve(start)

    @property
    def first(self) -> int:
        """
        The next id that L{allocate} hands out.
        """
        return self._next

    def _reserve(self, start: int) -> None:
        limit = start + self._blockSize
        writeAtomically(self._path, [b"%d\n" % (limit,)])
        self._next, self._limit = start, limit

    async def allocate(self) -> int:
        """
        The next UOW id; it is never handed out again, even after a crash.
        """
        if self._next >= self._limit:
            await self._lock.acquire()
            try:
                if self._next >= self._limit:
                    await self._blocking(self._reserve, self._limit)
            finally:
                self._lock.release()
        uowId = self._next
        self._next += 1
        return uowId
