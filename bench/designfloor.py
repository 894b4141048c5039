"""
The design floor: the least work the design's order of durable steps needs
for a request on the default config (spool, SQLite stash, filesystem stash),
with every shortcut a lower bound may take, to show how close to the
baseline any server that keeps the invariants can come on this machine.

    python -m bench.designfloor PORT DIRECTORY

A Klein app on the same Twisted, like the baseline. For each request it

 1. appends the body to one spool log and makes it durable (one C{writev}
    and one C{fdatasync} per batch of concurrent requests): invariant 3
    needs the request on disk before anything happens to it;
 2. then, at the same time, inserts it into SQLite (one transaction and one
    WAL fsync per batch, C{synchronous=FULL}) and writes it to a file of its
    own (one C{syncfs} per batch): invariant 1 needs both durable before
    the 200;
 3. answers 200.

Each step batches concurrent requests (group commit, one thread-pool hop
per batch). It leaves out everything else the server does: no undo record
or rollback, no pointer swap, no commit, no final state, no removal of the
spool, no UOW ids, queues or reports. Whatever it reaches bounds what the
full server can reach.
"""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path
from typing import Sequence

from klein import Klein
from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults

from apicontainer.blocking import inThreadPool
from apicontainer.storage._durable import syncFilesystem, writeFile
from apicontainer.storage._groupcommit import GroupCommit, Operation, Result, runEach

from .floor import serve, stored


def batched(*args: object) -> None:
    """
    The operation of a batch whose runBatch does the work of all at once.
    """


class DesignFloor:
    app = Klein()

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.files = directory / "files"
        os.makedirs(self.files, exist_ok=True)
        self.log = os.open(directory / "spool.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        self.db = sqlite3.connect(directory / "records.sqlite3", check_same_thread=False, isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.execute("CREATE TABLE IF NOT EXISTS documents (key TEXT PRIMARY KEY, body BLOB)")
        self.count = 0
        blocking = inThreadPool(reactor, reactor.getThreadPool())
        self.spool = GroupCommit(blocking, self.spoolBatch)
        self.records = GroupCommit(blocking, self.recordsBatch)
        self.documents = GroupCommit(blocking, self.filesBatch)

    def spoolBatch(self, operations: Sequence[Operation]) -> list[Result]:
        os.writev(self.log, [args[0] for _, args in operations])
        os.fdatasync(self.log)
        return [(True, None)] * len(operations)

    def recordsBatch(self, operations: Sequence[Operation]) -> list[Result]:
        self.db.execute("BEGIN")
        self.db.executemany("INSERT OR REPLACE INTO documents VALUES (?, ?)", [args for _, args in operations])
        self.db.execute("COMMIT")
        return [(True, None)] * len(operations)

    def filesBatch(self, operations: Sequence[Operation]) -> list[Result]:
        outcomes = runEach(operations)
        syncFilesystem(self.files)
        return outcomes

    @app.route("/", branch=True)
    def handle(self, request) -> Deferred[bytes]:  # type: ignore[no-untyped-def]
        body = request.content.read()
        self.count += 1
        key = str(self.count)

        def stash(_: object) -> Deferred[list[object]]:
            return gatherResults([
                self.records.submit(batched, key, body),
                self.documents.submit(writeFile, self.files / key, [body]),
            ])

        return self.spool.submit(batched, body).addCallback(stash).addCallback(lambda _: stored(request))


if __name__ == "__main__":
    serve(DesignFloor)
