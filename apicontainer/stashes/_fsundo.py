"""
The filesystem stash's undo records and rollback markers.

    root/.undo/batch-9.jsonl   the undo records (before-images) of the UOWs
                               of one batch, a JSON line each, until each of
                               them commits or rolls back
    root/.rolledback/17        marker: UOW 17 was rolled back (its content:
                               the attempt)

A batch writes its undo records to one journal file: creating a file is the
costliest system call a write makes, so a batch creates one for its
records, not one per record. A journal goes when the last of its records
does; until then a rolled-back record stays in it, and its rolled-back
marker keeps it from counting after a restart. What both folders hold is
read at start and kept in memory in step with every change, so that a
write does not probe the disk for it.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Callable, Iterator

from ..storage import makeDirectories, removeDurably, removeFile, removeTemporaries, writeAtomically, writeFile

_JOURNAL = re.compile(r"^batch-(?P<seq>[0-9]+)\.jsonl$")

# An undo record: key, attempt, before (the version it replaced, or None)
# and target (the version it wrote).
Undo = dict[str, Any]


def _journalLine(uowId: int, undo: Undo) -> bytes:
    return json.dumps({"uow": uowId, **undo}).encode() + b"\n"


def _readJournal(path: Path) -> list[tuple[int, Undo]]:
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


class UndoLog:
    """
    The undo records and rollback markers of one filesystem stash
    (blocking; run in the stash's thread or process).

    @param ensureDirectory: Makes a folder the stash may have lost (its
        root restored from a backup) before a write into it.
    @param fromSpare: Gives a new journal's path the inode of a spare file,
        if one waits (see L{FilesystemStash.prepareSpare}).
    """

    def __init__(
        self, root: Path, ensureDirectory: Callable[[Path], None], fromSpare: Callable[[Path], bool]
    ) -> None:
        self.directory = root / ".undo"
        self.markers = root / ".rolledback"
        self._ensureDirectory = ensureDirectory
        self._fromSpare = fromSpare
        self._undos: dict[int, Undo] = {}
        self._rolledBackAttempts: dict[int, int] = {}
        # Which journal holds each undo record, and which live records each
        # journal holds; the records of this batch not yet in its journal;
        # the number of the last journal.
        self._homes: dict[int, Path] = {}
        self._tenants: dict[Path, set[int]] = {}
        self._unwritten: list[int] = []
        self._journals = 0

    def open(self) -> None:
        """
        Read both folders, and drop the journals no live record needs.
        """
        makeDirectories(self.directory)
        makeDirectories(self.markers)
        removeTemporaries(self.directory)
        removeTemporaries(self.markers)
        self._rolledBackAttempts = {
            int(path.name): int(path.read_text("ascii")) for path in self.markers.iterdir() if path.name.isdigit()
        }
        self._undos, self._homes, self._tenants, self._unwritten = {}, {}, {}, []
        journals = []
        for path in self.directory.iterdir():
            match = _JOURNAL.match(path.name)
            if match is not None:
                journals.append((int(match["seq"]), path))
        for _, path in sorted(journals):  # a later record of a UOW replaces an earlier one
            self._tenants.setdefault(path, set())
            for uowId, undo in _readJournal(path):
                self._settle(uowId, undo, path)
        self._journals = max((seq for seq, _ in journals), default=0)
        for uowId, undo in list(self._undos.items()):
            if self.rolledBackAttempt(uowId) >= undo["attempt"]:
                self.forget(uowId, durably=False)  # rolled back: it stayed in its journal
        for path, tenants in list(self._tenants.items()):
            if not tenants:
                del self._tenants[path]
                removeFile(path)

    def get(self, uowId: int) -> Undo | None:
        return self._undos.get(uowId)

    def items(self) -> Iterator[tuple[int, Undo]]:
        return iter(list(self._undos.items()))

    def write(self, uowId: int, undo: Undo, sync: bool) -> None:
        """
        Record C{undo}. With C{sync} it goes durably to a journal of its
        own, which replaces the record it had; otherwise it goes to the
        batch's journal (L{writeBatch}), which the batch's sync makes durable.
        """
        if not sync:
            self._ensureDirectory(self.directory)
            self._undos[uowId] = undo
            self._unwritten.append(uowId)
            return
        path = self._nextJournal()
        writeAtomically(path, [_journalLine(uowId, undo)])
        self._settle(uowId, undo, path)

    def writeBatch(self) -> None:
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

    def endBatch(self) -> None:
        """
        Forget which records the batch had not written yet (a batch that
        failed before its journal).
        """
        self._unwritten = []

    def forget(self, uowId: int, durably: bool) -> None:
        """
        Drop the undo record of UOW C{uowId}: its file goes when it holds no
        other live record (durably if asked).
        """
        del self._undos[uowId]
        home = self._homes.pop(uowId, None)
        if home is not None:
            self._leave(uowId, home, durably)

    def rolledBackAttempt(self, uowId: int) -> int:
        """
        The latest attempt of UOW C{uowId} rolled back here, or 0.
        """
        return self._rolledBackAttempts.get(uowId, 0)

    def markRolledBack(self, uowId: int, attempt: int) -> None:
        """
        Record, durably, that UOW C{uowId} was rolled back up to C{attempt}.
        """
        attempt = max(self.rolledBackAttempt(uowId), attempt)
        self._ensureDirectory(self.markers)
        writeAtomically(self.markers / str(uowId), [b"%d" % (attempt,)])
        self._rolledBackAttempts[uowId] = attempt

    def clearRolledBack(self, uowId: int) -> None:
        """
        Drop UOW C{uowId}'s rollback marker, if it has one (it committed).
        """
        if self._rolledBackAttempts.pop(uowId, None) is not None:
            removeFile(self.markers / str(uowId))

    def prune(self, horizon: int) -> int:
        """
        Drop the markers of attempts before C{horizon}.

        @return: How many went.
        """
        old = [uowId for uowId, attempt in self._rolledBackAttempts.items() if attempt < horizon]
        for uowId in old:
            removeFile(self.markers / str(uowId))
            del self._rolledBackAttempts[uowId]
        return len(old)

    def _nextJournal(self) -> Path:
        self._journals += 1
        return self.directory / f"batch-{self._journals}.jsonl"

    def _settle(self, uowId: int, undo: Undo, path: Path) -> None:
        """
        Note that C{path} holds C{undo}, the live record of UOW C{uowId}.
        """
        previous = self._homes.get(uowId)
        if previous is not None and previous != path:
            self._leave(uowId, previous, durably=False)
        self._undos[uowId], self._homes[uowId] = undo, path
        self._tenants.setdefault(path, set()).add(uowId)

    def _leave(self, uowId: int, home: Path, durably: bool) -> None:
        tenants = self._tenants[home]
        tenants.discard(uowId)
        if not tenants:
            del self._tenants[home]
            if durably:
                removeDurably(home)
            else:
                removeFile(home)
