"""
The C{sqlite} stash: documents in an embedded SQLite database.

The tables and their rules are those of L{DocumentTables}: the before-image
of every write is saved in an undo table, keyed by UOW, in the same
transaction as the write. The database runs in WAL mode with
C{synchronous=FULL}: a committed transaction survives a power cut.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any, Callable, Sequence, TypeVar

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from ..blocking import Blocking
from ..config import StashSpec
from ..interfaces import IBatchStash, ILocalStorage, IProbe, IPrunable, IReader, IStartable
from ..storage import GroupCommit, Operation, Result, each, immediate
from ..uow import Document, UnitOfWork, Verdict
from ._context import StashContext, allUnavailable, released, unavailable, verdictsOf
from ._sqldocuments import DocumentTables, tableOption

T = TypeVar("T")

# SQLite's default wal_autocheckpoint (1000 pages) of its default page size.
CHECKPOINT_BYTES = 1000 * 4096


def _each(cursor: sqlite3.Cursor, operation: Callable[..., Any], uows: Sequence[UnitOfWork]) -> list[Result]:
    """
    Run C{operation} on each of C{uows}, each in a savepoint of its own
    inside the caller's transaction, so that one UOW's failure leaves the
    others' writes whole.
    """
    outcomes: list[Result] = []
    for uow in uows:
        cursor.execute("SAVEPOINT one")
        try:
            outcomes.append((True, operation(cursor, uow)))
        except Exception:
            outcomes.append((False, Failure()))
            cursor.execute("ROLLBACK TO one")
        cursor.execute("RELEASE one")
    return outcomes


@implementer(IBatchStash, IReader, IStartable, IProbe, ILocalStorage, IPrunable)
class SQLiteStash:
    """
    Documents in one SQLite table, with an undo table beside it.

    One connection, used by one call at a time through a serial runner, so
    transactions never interleave. Operations of concurrent UOWs share one
    transaction and one fsync (group commit), each in a savepoint of its
    own, so that one UOW's failure leaves the others' writes whole.
    """

    log = Logger()

    def __init__(self, name: str, path: Path, blocking: Blocking, table: str = "documents") -> None:
        self.name = name
        self.path = path
        self._tables = DocumentTables(table)
        self.table = table
        self._blocking = blocking
        self._connection: sqlite3.Connection | None = None
        self._group = GroupCommit(blocking, self._runBatch)

    @classmethod
    def fromConfig(cls, spec: StashSpec, context: StashContext) -> SQLiteStash:
        """
        Build the stash from its options: C{path} (relative to the data
        directory) and C{table} (default C{documents}).
        """
        path = spec.options.string("path")
        table = tableOption(spec.options)
        return cls(spec.name, context.path(path), context.serial(spec.name), table)

    @property
    def location(self) -> Path:
        return self.path.parent

    @property
    def files(self) -> tuple[Path, ...]:
        return (self.path,)

    def bytesFor(self, size: int) -> int:
        # The document and its before-image in the write-ahead log, and the
        # copy of them a checkpoint makes into the database file; a
        # checkpoint copies up to a whole log's worth of pages at once.
        return 3 * size + CHECKPOINT_BYTES

    def start(self) -> Deferred[None]:
        return self._blocking(self._open)

    def _open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            connection = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            connection.execute("PRAGMA journal_mode=WAL")
        except sqlite3.Error as e:
            raise sqlite3.OperationalError(f"{e}: {self.path}") from e
        connection.execute("PRAGMA synchronous=FULL")
        self._tables.create(connection.cursor())
        self._connection = connection

    def stop(self) -> Deferred[None]:
        return released(self._blocking, self._blocking(self._close))

    def _close(self) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None

    def _db(self) -> sqlite3.Connection:
        """
        The connection, opened now if C{start} could not open it.
        """
        if self._connection is None:
            self._open()
        assert self._connection is not None
        return self._connection

    def stash(self, uow: UnitOfWork) -> Deferred[Verdict]:
        return self._inTransaction(self._tables.stash, uow).addErrback(unavailable(self, uow, sqlite3.Error, OSError))

    def stashBatch(self, uows: Sequence[UnitOfWork]) -> Deferred[list[Verdict]]:
        errors = (sqlite3.Error, OSError)
        return (
            self._inTransaction(_each, self._tables.stash, uows)
            .addCallback(lambda outcomes: verdictsOf(self, uows, outcomes, *errors))
            .addErrback(allUnavailable(self, uows, *errors))
        )

    def commitBatch(self, uows: Sequence[UnitOfWork]) -> Deferred[list[Failure | None]]:
        return self._inTransaction(_each, self._tables.commit, uows).addCallback(
            lambda outcomes: [None if ok else failure for ok, failure in outcomes]
        )

    def _inTransaction(self, operation: Callable[..., T], *args: Any) -> Deferred[T]:
        return self._group.submit(operation, *args)

    def _runBatch(self, operations: Sequence[Operation]) -> list[Result]:
        with immediate(self._db()) as db:
            cursor = db.cursor()

            def run(operation: Operation) -> Any:
                function, args = operation
                cursor.execute("SAVEPOINT operation")
                try:
                    result = function(cursor, *args)
                except BaseException:
                    cursor.execute("ROLLBACK TO operation")
                    cursor.execute("RELEASE operation")
                    raise
                cursor.execute("RELEASE operation")
                return result

            return each(operations, run)

    def rollback(self, uow: UnitOfWork) -> Deferred[None]:
        return self._inTransaction(self._tables.rollback, uow)

    def commit(self, uow: UnitOfWork) -> Deferred[None]:
        return self._inTransaction(self._tables.commit, uow)

    def prune(self, horizon: int) -> Deferred[int]:
        return self._inTransaction(self._tables.prune, horizon)

    def probe(self) -> Deferred[None]:
        return self._blocking(lambda: self._db().execute("SELECT 1").fetchone() and None)

    def read(self, key: str) -> Deferred[Document | None]:
        return self._blocking(lambda: self._tables.read(self._db().cursor(), key))
