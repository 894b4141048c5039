"""
The C{filesystem} stash: each document a plain file under C{root}.

Layout, for the key C{/items/42}::

    root/items/42.doc          symlink to the current version: cat it
    root/items/42.v17          the body written by UOW 17
    root/items/42.v17.type     its content type, when it had one
    root/.undo/17.json         UOW 17's before-image, until commit
    root/.rolledback/17        marker: UOW 17 was rolled back

Each key segment is percent-encoded (every byte but letters, digits, C{-}
and C{_}), so a segment is never C{.} or C{..}, never contains C{/}, and
never collides with the C{.doc}/C{.v} names; an over-long segment is replaced
by a hash. No key can name a path outside C{root}.

A write lands by writing and fsyncing the new version, recording the undo
durably, then atomically replacing the C{.doc} symlink and fsyncing its
directory. Writes of concurrent UOWs go in batches (group commit): the
versions and undo records of a batch are made durable by one C{syncfs},
and the pointer swaps by another. A deleted document is a symlink to a C{.d<uow>} name that does
not exist, so that an older UOW can never bring it back.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Sequence
from urllib.parse import quote

from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from ..blocking import Blocking
from ..config import StashSpec
from ..groupcommit import GroupCommit, Operation, Outcome
from ..durable import (
    fsyncDirectory,
    makeDirectories,
    removeDurably,
    removeTemporaries,
    syncFilesystem,
    writeAtomically,
)
from ..interfaces import IProbe, IReader, IStartable, IStash
from ..uow import Document, UnitOfWork, Verdict
from . import StashContext, unavailable

_SAFE = "-_"
_MAX_SEGMENT = 120
_TARGET = re.compile(r"^(?P<stem>[A-Za-z0-9%_~-]+)\.(?P<kind>[vd])(?P<uow>[0-9]+)$")


def _unlink(path: Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def encodeSegment(segment: str) -> str:
    """
    A key segment as a file name that is always safe and never special.
    """
    encoded = quote(segment, safe=_SAFE).replace(".", "%2E").replace("~", "%7E")
    if not encoded or len(encoded) > _MAX_SEGMENT:
        return "~" + hashlib.sha256(segment.encode("utf-8", "surrogatepass")).hexdigest()
    return encoded


@implementer(IStash, IReader, IStartable, IProbe)
class FilesystemStash:
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
        self._group = GroupCommit(blocking, self._runBatch)
        self._swaps: list[tuple[Path, str, int]] = []
        self._outcomes: list[Outcome] = []

    @classmethod
    def fromConfig(cls, spec: StashSpec, context: StashContext) -> FilesystemStash:
        """
        Build the stash from its options: C{root} (relative to the data
        directory).
        """
        root = spec.options.string("root")
        return cls(spec.name, context.path(root), context.blocking)

    def start(self) -> Deferred[None]:
        return self._blocking(self._open)

    def _open(self) -> None:
        makeDirectories(self._undo)
        makeDirectories(self._rolledBack)
        removeTemporaries(self._undo)
        removeTemporaries(self._rolledBack)

    def stop(self) -> Deferred[None]:
        return succeed(None)

    def probe(self) -> Deferred[None]:
        def check() -> None:
            if not self._undo.is_dir() or not os.access(self._undo, os.W_OK):
                raise OSError(f"{self.root} is not a writable directory with its .undo folder")

        return self._blocking(check)

    def _pointer(self, key: str) -> Path:
        segments = [encodeSegment(s) for s in key.strip("/").split("/")]
        *directories, leaf = segments
        return self.root.joinpath(*directories, leaf + ".doc")

    def _current(self, pointer: Path) -> tuple[str, int] | None:
        """
        The name the pointer links to and the UOW that wrote it.
        """
        try:
            target = os.readlink(pointer)
        except FileNotFoundError:
            return None
        match = _TARGET.match(target)
        if match is None:
            raise OSError(f"{pointer} points at {target!r}, which is not a version")
        return target, int(match["uow"])

    def _undoPath(self, uowId: int) -> Path:
        return self._undo / f"{uowId}.json"

    def _readUndo(self, uowId: int) -> dict | None:  # type: ignore[type-arg]
        try:
            return json.loads(self._undoPath(uowId).read_bytes())  # type: ignore[no-any-return]
        except FileNotFoundError:
            return None

    def _rolledBackAttempt(self, uowId: int) -> int:
        try:
            return int((self._rolledBack / str(uowId)).read_text("ascii"))
        except FileNotFoundError:
            return 0

    def stash(self, uow: UnitOfWork) -> Deferred[Verdict]:
        return self._group.submit(self._stash, uow, uow.body, uow.contentType).addErrback(unavailable(self, uow, OSError))

    def _runBatch(self, operations: Sequence[Operation]) -> list[Outcome]:
        """
        Run a batch: a stash's pointer swap waits for the end of the batch
        (or for the next rollback or commit, which must see it), so that the
        directories are fsynced once for all of them.
        """
        self._outcomes = []
        try:
            for function, args in operations:
                if function != self._stash:
                    self._swapPending()
                try:
                    self._outcomes.append((True, function(*args)))
                except Exception:
                    self._outcomes.append((False, Failure()))
            self._swapPending()
            return self._outcomes
        finally:
            self._swaps, self._outcomes = [], []

    def _swapPending(self) -> None:
        """
        Make the pending versions and undo records durable (one syncfs for
        all), swap their pointers, and make the swaps durable (another).
        """
        swaps, self._swaps = self._swaps, []
        if not swaps:
            return
        try:
            syncFilesystem(self.root)
            for pointer, target, _ in swaps:
                self._link(pointer, target)
            syncFilesystem(self.root)
        except OSError:
            failure = Failure()
            for _, _, index in swaps:
                self._outcomes[index] = (False, failure)

    def _swapLater(self, pointer: Path, target: str) -> None:
        self._swaps.append((pointer, target, len(self._outcomes)))

    def _stash(self, uow: UnitOfWork, body: bytes, contentType: str | None) -> Verdict:
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
                self._writeVersion(pointer, undo["target"], body, contentType)
                self._swapLater(pointer, undo["target"])
                return Verdict.stored(detail="completed after a crash")
            return Verdict.stored(detail="already stored")
        if current is not None and current[1] >= uow.id:
            if current[1] == uow.id:
                return Verdict.stored(detail="already stored")
            return Verdict.declined(f"superseded by UOW {current[1]}")
        stem = pointer.name[: -len(".doc")]
        target = f"{stem}.{'d' if uow.isDelete else 'v'}{uow.id}"
        self._writeVersion(pointer, target, body, contentType)
        makeDirectories(self._undo)  # brings the stash back after its root was restored
        undo = {
            "key": uow.key,
            "attempt": uow.attempt,
            "before": current[0] if current else None,
            "target": target,
        }
        writeAtomically(self._undoPath(uow.id), [json.dumps(undo).encode()], sync=False)
        self._swapLater(pointer, target)
        return Verdict.stored(status=200)

    def _writeVersion(self, pointer: Path, target: str, body: bytes, contentType: str | None) -> None:
        """
        Write the version file C{target} (nothing for a deletion's C{.d}
        target) beside C{pointer}, durably.
        """
        makeDirectories(pointer.parent)
        if _TARGET.match(target)["kind"] == "d":  # type: ignore[index]
            return
        writeAtomically(pointer.with_name(target), [body], sync=False)
        if contentType:
            writeAtomically(pointer.with_name(target + ".type"), [contentType.encode("utf-8")], sync=False)

    def _point(self, pointer: Path, target: str | None) -> None:
        """
        Make C{pointer} link to C{target} (remove it for L{None}), atomically
        and durably.
        """
        if target is None:
            removeDurably(pointer)
            return
        self._link(pointer, target)
        fsyncDirectory(pointer.parent)

    def _link(self, pointer: Path, target: str) -> None:
        """
        Make C{pointer} link to C{target}, atomically (not yet durably).
        """
        temporary = pointer.with_name(f".tmp-{pointer.name}")
        try:
            os.unlink(temporary)
        except FileNotFoundError:
            pass
        os.symlink(target, temporary)
        os.rename(temporary, pointer)

    def _removeVersion(self, directory: Path, target: str | None) -> None:
        if target is None or target.split(".")[-1].startswith("d"):
            return
        for name in (target, target + ".type"):
            try:
                os.unlink(directory / name)
            except FileNotFoundError:
                pass

    def rollback(self, uow: UnitOfWork) -> Deferred[None]:
        return self._group.submit(self._rollback, uow)

    def _rollback(self, uow: UnitOfWork) -> None:
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
        makeDirectories(self._rolledBack)
        writeAtomically(self._rolledBack / str(uow.id), [b"%d" % (attempt,)])
        if undo is not None:
            removeDurably(self._undoPath(uow.id))

    def _handOver(self, undo: dict) -> None:  # type: ignore[type-arg]
        """
        A later UOW wrote over the one being rolled back: keep its write,
        and make its own rollback restore our before-image, not our write.
        """
        for path in self._undo.glob("*.json"):
            later = json.loads(path.read_bytes())
            if later["key"] == undo["key"] and later["before"] == undo["target"]:
                later["before"] = undo["before"]
                writeAtomically(path, [json.dumps(later).encode()])

    def commit(self, uow: UnitOfWork) -> Deferred[None]:
        return self._group.submit(self._commit, uow)

    def _commit(self, uow: UnitOfWork) -> None:
        # Nothing here needs an fsync: the write is already durable, and an
        # undo record or old version that a crash brings back is only
        # clutter (a replay finds the write in place, and no rollback is
        # sent after a commit).
        _unlink(self._rolledBack / str(uow.id))
        undo = self._readUndo(uow.id)
        if undo is None:
            return
        pointer = self._pointer(undo["key"])
        current = self._current(pointer)
        if undo["before"] is not None and (current is None or current[0] != undo["before"]):
            self._removeVersion(pointer.parent, undo["before"])
        _unlink(self._undoPath(uow.id))

    def read(self, key: str) -> Deferred[Document | None]:
        return self._blocking(self._read, key)

    def _read(self, key: str) -> Document | None:
        pointer = self._pointer(key)
        current = self._current(pointer)
        if current is None or _TARGET.match(current[0])["kind"] == "d":  # type: ignore[index]
            return None
        version = pointer.with_name(current[0])
        try:
            contentType: str | None = version.with_name(current[0] + ".type").read_text("utf-8")
        except FileNotFoundError:
            contentType = None
        return Document(version.read_bytes(), contentType, current[1])
