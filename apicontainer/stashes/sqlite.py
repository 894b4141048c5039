"""
The C{sqlite} stash: documents in an embedded SQLite database.

Each document row holds the body, its content type and the UOW that wrote it
(a deleted document stays as a row with no body, so that an older UOW can
never bring it back). The before-image of every write is saved in an undo
table, keyed by UOW, in the same transaction as the write. The database runs
in WAL mode with C{synchronous=FULL}: a committed transaction survives a
power cut.
"""

from __future__ import annotations

import re
import sqlite3
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from zope.interface import implementer

from ..blocking import Blocking
from ..config import StashSpec
from ..interfaces import IReader, IStartable, IStash
from ..uow import Document, UnitOfWork, Verdict
from . import StashContext

_TABLE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")

PREPARED = "prepared"
ROLLED_BACK = "rolledback"


@implementer(IStash, IReader, IStartable)
class SQLiteStash:
    """
    Documents in one SQLite table, with an undo table beside it.

    One connection, used by one call at a time through a serial runner, so
    transactions never interleave.
    """

    log = Logger()

    def __init__(self, name: str, path: Path, blocking: Blocking, table: str = "documents") -> None:
        if not _TABLE.match(table):
            raise ValueError(f"not a table name: {table!r}")
        self.name = name
        self.path = path
        self.table = table
        self._blocking = blocking
        self._connection: sqlite3.Connection | None = None

    @classmethod
    def fromConfig(cls, spec: StashSpec, context: StashContext) -> SQLiteStash:
        """
        Build the stash from its options: C{path} (relative to the data
        directory) and C{table} (default C{documents}).
        """
        path = spec.options.string("path")
        table = spec.options.string("table", "documents")
        if not _TABLE.match(table):
            raise spec.options.error("table", f"not a table name: {table!r}")
        return cls(spec.name, context.path(path), context.serial(spec.name), table)

    def start(self) -> Deferred[None]:
        return self._blocking(self._open)

    def _open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        connection = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        connection.execute("PRAGMA journal_mode=WAL")
        connection.execute("PRAGMA synchronous=FULL")
        connection.execute(
            f'CREATE TABLE IF NOT EXISTS "{self.table}" ('
            " key TEXT PRIMARY KEY, body BLOB, content_type TEXT,"
            " uow INTEGER NOT NULL)"
        )
        connection.execute(
            f'CREATE TABLE IF NOT EXISTS "{self.table}_undo" ('
            " uow INTEGER PRIMARY KEY, attempt INTEGER NOT NULL, key TEXT NOT NULL,"
            " state TEXT NOT NULL, had_row INTEGER NOT NULL, body BLOB,"
            " content_type TEXT, prev_uow INTEGER)"
        )
        self._connection = connection

    def stop(self) -> Deferred[None]:
        return self._blocking(self._close)

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

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        connection = self._db()
        connection.execute("BEGIN IMMEDIATE")
        try:
            yield connection
        except BaseException:
            connection.execute("ROLLBACK")
            raise
        connection.execute("COMMIT")

    def stash(self, uow: UnitOfWork) -> Deferred[Verdict]:
        def failed(reason):  # type: ignore[no-untyped-def]
            reason.trap(sqlite3.Error, OSError)
            self.log.warn(
                "stash {stash} could not store UOW {uow}: {error}",
                stash=self.name,
                uow=uow.id,
                error=str(reason.value),
            )
            return Verdict.failed(503, f"sqlite: {reason.value}")

        return self._blocking(self._stash, uow).addErrback(failed)

    def _stash(self, uow: UnitOfWork) -> Verdict:
        t = self.table
        with self._transaction() as db:
            undo = db.execute(
                f'SELECT attempt, state FROM "{t}_undo" WHERE uow = ?', (uow.id,)
            ).fetchone()
            if undo is not None:
                attempt, state = undo
                if state == PREPARED:
                    return Verdict.stored(detail="already stored")
                if attempt >= uow.attempt:
                    return Verdict.declined("rolled back before it arrived")
            current = db.execute(
                f'SELECT body, content_type, uow FROM "{t}" WHERE key = ?', (uow.key,)
            ).fetchone()
            if current is not None and current[2] >= uow.id:
                if current[2] == uow.id:
                    return Verdict.stored(detail="already stored")
                return Verdict.declined(f"superseded by UOW {current[2]}")
            before = current or (None, None, None)
            db.execute(
                f'INSERT OR REPLACE INTO "{t}_undo" VALUES (?, ?, ?, ?, ?, ?, ?, ?)',
                (uow.id, uow.attempt, uow.key, PREPARED, current is not None, *before),
            )
            body, contentType = (None, None) if uow.isDelete else (uow.body, uow.contentType)
            db.execute(
                f'INSERT INTO "{t}" (key, body, content_type, uow) VALUES (?, ?, ?, ?)'
                " ON CONFLICT (key) DO UPDATE SET body = excluded.body,"
                " content_type = excluded.content_type, uow = excluded.uow",
                (uow.key, body, contentType, uow.id),
            )
        return Verdict.stored(status=200)

    def rollback(self, uow: UnitOfWork) -> Deferred[None]:
        return self._blocking(self._rollback, uow)

    def _rollback(self, uow: UnitOfWork) -> None:
        t = self.table
        with self._transaction() as db:
            undo = db.execute(
                f'SELECT attempt, state, had_row, body, content_type, prev_uow FROM "{t}_undo"'
                " WHERE uow = ?",
                (uow.id,),
            ).fetchone()
            if undo is None:
                # Nothing stored yet: leave a marker so that a late stash of
                # this attempt stores nothing.
                db.execute(
                    f'INSERT INTO "{t}_undo" (uow, attempt, key, state, had_row)'
                    " VALUES (?, ?, ?, ?, 0)",
                    (uow.id, uow.attempt, uow.key, ROLLED_BACK),
                )
                return
            attempt, state, hadRow, body, contentType, previous = undo
            if state == PREPARED:
                row = db.execute(f'SELECT uow FROM "{t}" WHERE key = ?', (uow.key,)).fetchone()
                if row is not None and row[0] == uow.id:
                    if hadRow:
                        db.execute(
                            f'UPDATE "{t}" SET body = ?, content_type = ?, uow = ? WHERE key = ?',
                            (body, contentType, previous, uow.key),
                        )
                    else:
                        db.execute(f'DELETE FROM "{t}" WHERE key = ?', (uow.key,))
                else:
                    # A later UOW wrote over ours: keep its write, and make
                    # its own rollback restore our before-image, not our write.
                    db.execute(
                        f'UPDATE "{t}_undo" SET had_row = ?, body = ?, content_type = ?,'
                        " prev_uow = ? WHERE key = ? AND prev_uow = ? AND state = ?",
                        (hadRow, body, contentType, previous, uow.key, uow.id, PREPARED),
                    )
            db.execute(
                f'UPDATE "{t}_undo" SET state = ?, attempt = ?, had_row = 0, body = NULL,'
                " content_type = NULL, prev_uow = NULL WHERE uow = ?",
                (ROLLED_BACK, max(attempt, uow.attempt), uow.id),
            )

    def commit(self, uow: UnitOfWork) -> Deferred[None]:
        return self._blocking(self._commit, uow)

    def _commit(self, uow: UnitOfWork) -> None:
        with self._transaction() as db:
            db.execute(
                f'DELETE FROM "{self.table}_undo" WHERE uow = ? AND state = ?',
                (uow.id, PREPARED),
            )

    def read(self, key: str) -> Deferred[Document | None]:
        return self._blocking(self._read, key)

    def _read(self, key: str) -> Document | None:
        row = self._db().execute(
            f'SELECT body, content_type, uow FROM "{self.table}"'
            " WHERE key = ? AND body IS NOT NULL",
            (key,),
        ).fetchone()
        return None if row is None else Document(bytes(row[0]), row[1], row[2])
