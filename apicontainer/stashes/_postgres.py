"""
The C{postgres} stash: documents in a PostgreSQL table.

psycopg 3 runs in the threads of a L{twisted.enterprise.adbapi.ConnectionPool}
(one connection per concurrent call, up to the stash's C{concurrency}), so
the reactor never blocks. The tables and their rules are those of
L{DocumentTables}: each write and its before-image in one transaction;
transactions on one key are serialized with an advisory lock. A lost
connection is a 503 verdict; the pool reconnects on the next call.
"""

from __future__ import annotations

from typing import Any, Callable, TypeVar

from twisted.enterprise import adbapi
from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger
from zope.interface import implementer

from ..config import StashSpec
from ..interfaces import IProbe, IPrunable, IReader, IStartable, IStash
from ..uow import Document, UnitOfWork, Verdict
from ._context import ForeignNumbering, StashContext, claimProblem, unavailable
from ._sqldocuments import DocumentTables, tableOption

T = TypeVar("T")


def _unavailable() -> tuple[type[BaseException], ...]:
    import psycopg

    return (psycopg.OperationalError, psycopg.InterfaceError, adbapi.ConnectionLost)


@implementer(IStash, IReader, IStartable, IProbe, IPrunable)
class PostgresStash:
    """
    Documents in one PostgreSQL table, with an undo table beside it.
    """

    log = Logger()

    def __init__(
        self,
        name: str,
        dsn: str,
        reactor: Any,
        table: str = "documents",
        poolSize: int = 16,
        connectTimeout: float = 5.0,
        numbering: Callable[[], str | None] = lambda: None,
    ) -> None:
        self.name = name
        self.dsn = dsn
        self.table = table
        self._tables = DocumentTables(table, "%s", self._lockKey)
        self._reactor = reactor
        self._poolSize = poolSize
        self._connectTimeout = connectTimeout
        self._pool: adbapi.ConnectionPool | None = None
        self._created = False
        self._numbering = numbering

    @classmethod
    def fromConfig(cls, spec: StashSpec, context: StashContext) -> PostgresStash:
        """
        Build the stash from its options: C{dsn} (a libpq connection string or
        URI) and C{table} (default C{documents}); C{concurrency} sizes the
        connection pool.
        """
        dsn = spec.options.string("dsn")
        table = tableOption(spec.options)
        try:
            import psycopg.conninfo

            psycopg.conninfo.conninfo_to_dict(dsn)
        except Exception as e:
            raise spec.options.error("dsn", f"not a PostgreSQL connection string: {e}") from None
        return cls(spec.name, dsn, context.reactor, table, poolSize=spec.concurrency, numbering=context.numbering)

    def _lockKey(self, cursor: Any, key: str) -> None:
        cursor.execute("SELECT pg_advisory_xact_lock(hashtextextended(%s, 0))", (f"{self.table}:{key}",))

    def start(self) -> Deferred[None]:
        self._pool = adbapi.ConnectionPool(
            "psycopg",
            self.dsn,
            connect_timeout=max(1, int(self._connectTimeout)),
            cp_min=1,
            cp_max=self._poolSize,
            cp_reconnect=True,
            cp_noisy=False,
            cp_reactor=self._reactor,
        )
        return self._run(lambda cursor: None)

    def stop(self) -> Deferred[None]:
        if self._pool is not None:
            self._pool.close()
            self._pool = None
        return succeed(None)

    def _run(self, operation: Callable[..., T], *args: Any) -> Deferred[T]:
        """
        Run C{operation(cursor, *args)} in one transaction, creating the
        tables first if that has not been done yet.
        """
        if self._pool is None:
            raise RuntimeError(f"stash {self.name} is not started")

        def interaction(cursor: Any) -> T:
            if not self._created:
                self._tables.create(cursor, blob="BYTEA", integer="BIGINT")
                self._claim(cursor)
            result = operation(cursor, *args)
            return result

        def created(result: T) -> T:
            self._created = True
            return result

        return self._pool.runInteraction(interaction).addCallback(created)

    def _claim(self, cursor: Any) -> None:
        """
        Record this server's UOW numbering beside the table, or refuse the
        table if another numbering is recorded there.

        @raise ForeignNumbering: Another data directory writes the table.
        """
        ours = self._numbering()
        if ours is None:
            return
        claims = f"{self.table}_numbering"
        cursor.execute(
            f'CREATE TABLE IF NOT EXISTS "{claims}" (one INTEGER PRIMARY KEY CHECK (one = 1), numbering TEXT NOT NULL)'
        )
        cursor.execute(f'INSERT INTO "{claims}" VALUES (1, %s) ON CONFLICT (one) DO NOTHING', (ours,))
        cursor.execute(f'SELECT numbering FROM "{claims}"')
        problem = claimProblem(self.name, f"table {self.table}", cursor.fetchone()[0], ours)
        if problem is not None:
            raise problem

    def stash(self, uow: UnitOfWork) -> Deferred[Verdict]:
        return self._run(self._tables.stash, uow).addErrback(
            unavailable(self, uow, *_unavailable(), ForeignNumbering)
        )

    def rollback(self, uow: UnitOfWork) -> Deferred[None]:
        return self._run(self._tables.rollback, uow)

    def commit(self, uow: UnitOfWork) -> Deferred[None]:
        return self._run(self._tables.commit, uow)

    def prune(self, horizon: int) -> Deferred[int]:
        return self._run(self._tables.prune, horizon)

    def probe(self) -> Deferred[None]:
        return self._run(lambda cursor: cursor.execute("SELECT 1"))

    def read(self, key: str) -> Deferred[Document | None]:
        return self._run(self._tables.read, key)

