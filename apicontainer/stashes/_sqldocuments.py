"""
The stash contract in SQL, shared by the C{sqlite} and C{postgres} stashes.

A documents table holds, per key, the body, its content type and the UOW
that wrote it (a deleted document stays as a row without body, so that an
older UOW can never bring it back). An undo table holds, per UOW, the state
of its rollback data (C{prepared}: the before-image; C{rolledback}: a marker
that blocks a late stash of that attempt). Each operation runs in one
transaction of the caller's, through any DB-API cursor.
"""

from __future__ import annotations

import re
from typing import Any, Callable

from ..uow import Document, UnitOfWork, Verdict

PREPARED = "prepared"
ROLLED_BACK = "rolledback"

_TABLE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")


def checkTableName(table: str) -> str:
    """
    @raise ValueError: C{table} is not a plain SQL identifier.
    """
    if not _TABLE.match(table):
        raise ValueError(f"not a table name: {table!r}")
    return table


def tableOption(options: Any) -> str:
    """
    The C{table} option of a stash's config section (default C{documents}),
    checked.

    @raise apicontainer.config.ConfigError: It is not a plain identifier.
    """
    table: str = options.string("table", "documents")
    try:
        return checkTableName(table)
    except ValueError as e:
        raise options.error("table", str(e)) from None


class DocumentTables:
    """
    The documents table C{table} and its undo table C{table_undo}.

    @param placeholder: The driver's parameter marker (C{?} or C{%s}).
    @param lockKey: Called with the cursor and a key first thing in a
        transaction that changes the key, to serialize such transactions
        where the database does not already (advisory locks in PostgreSQL).
    """

    def __init__(
        self,
        table: str,
        placeholder: str = "?",
        lockKey: Callable[[Any, str], None] = lambda cursor, key: None,
    ) -> None:
        self.table = checkTableName(table)
        self.undo = f"{table}_undo"
        self._mark = placeholder
        self._lock = lockKey

    def _sql(self, statement: str) -> str:
        return statement.replace("?", self._mark).format(t=self.table, u=self.undo)

    def create(self, cursor: Any, blob: str = "BLOB", integer: str = "INTEGER") -> None:
        """
        Create both tables if they are missing.
        """
        cursor.execute(
            f'CREATE TABLE IF NOT EXISTS "{self.table}" (key TEXT PRIMARY KEY, body {blob},'
            f" content_type TEXT, uow {integer} NOT NULL)"
        )
        cursor.execute(
            f'CREATE TABLE IF NOT EXISTS "{self.undo}" (uow {integer} PRIMARY KEY,'
            f" attempt {integer} NOT NULL, key TEXT NOT NULL, state TEXT NOT NULL,"
            f" had_row INTEGER NOT NULL, body {blob}, content_type TEXT, prev_uow {integer})"
        )

    def stash(self, cursor: Any, uow: UnitOfWork) -> Verdict:
        """
        Apply C{uow} and save its before-image, in the caller's transaction
        (in the thread that runs it: a large body is read from disk here,
        only when it is written).
        """
        sql = self._sql
        self._lock(cursor, uow.key)
        cursor.execute(sql('SELECT attempt, state FROM "{u}" WHERE uow = ?'), (uow.id,))
        undo = cursor.fetchone()
        if undo is not None:
            attempt, state = undo
            if state == PREPARED:
                return Verdict.stored(detail="already stored")
            if attempt >= uow.attempt:
                return Verdict.declined("rolled back before it arrived")
        cursor.execute(sql('SELECT body, content_type, uow FROM "{t}" WHERE key = ?'), (uow.key,))
        current = cursor.fetchone()
        if current is not None and current[2] >= uow.id:
            if current[2] == uow.id:
                return Verdict.stored(detail="already stored")
            return Verdict.declined(f"superseded by UOW {current[2]}")
        before = tuple(current) if current is not None else (None, None, None)
        cursor.execute(
            sql(
                'INSERT INTO "{u}" (uow, attempt, key, state, had_row, body, content_type, prev_uow)'
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (uow) DO UPDATE SET"
                " attempt = excluded.attempt, key = excluded.key, state = excluded.state,"
                " had_row = excluded.had_row, body = excluded.body,"
                " content_type = excluded.content_type, prev_uow = excluded.prev_uow"
            ),
            (uow.id, uow.attempt, uow.key, PREPARED, int(current is not None), *before),
        )
        newBody, newType = (None, None) if uow.isDelete else (uow.body, uow.contentType)
        cursor.execute(
            sql(
                'INSERT INTO "{t}" (key, body, content_type, uow) VALUES (?, ?, ?, ?)'
                " ON CONFLICT (key) DO UPDATE SET body = excluded.body,"
                " content_type = excluded.content_type, uow = excluded.uow"
            ),
            (uow.key, newBody, newType, uow.id),
        )
        return Verdict.stored()

    def rollback(self, cursor: Any, uow: UnitOfWork) -> None:
        """
        Undo C{uow}, or block its late stash, in the caller's transaction.
        """
        sql = self._sql
        self._lock(cursor, uow.key)
        cursor.execute(
            sql('SELECT attempt, state, had_row, body, content_type, prev_uow FROM "{u}" WHERE uow = ?'),
            (uow.id,),
        )
        undo = cursor.fetchone()
        if undo is None:
            cursor.execute(
                sql('INSERT INTO "{u}" (uow, attempt, key, state, had_row) VALUES (?, ?, ?, ?, 0)'),
                (uow.id, uow.attempt, uow.key, ROLLED_BACK),
            )
            return
        attempt, state, hadRow, body, contentType, previous = undo
        if state == PREPARED:
            cursor.execute(sql('SELECT uow FROM "{t}" WHERE key = ?'), (uow.key,))
            row = cursor.fetchone()
            if row is not None and row[0] == uow.id:
                if hadRow:
                    cursor.execute(
                        sql('UPDATE "{t}" SET body = ?, content_type = ?, uow = ? WHERE key = ?'),
                        (body, contentType, previous, uow.key),
                    )
                else:
                    cursor.execute(sql('DELETE FROM "{t}" WHERE key = ?'), (uow.key,))
            else:
                # A later UOW wrote over ours: keep its write, and make its
                # own rollback restore our before-image, not our write.
                cursor.execute(
                    sql(
                        'UPDATE "{u}" SET had_row = ?, body = ?, content_type = ?, prev_uow = ?'
                        " WHERE key = ? AND prev_uow = ? AND state = ?"
                    ),
                    (hadRow, body, contentType, previous, uow.key, uow.id, PREPARED),
                )
        cursor.execute(
            sql(
                'UPDATE "{u}" SET state = ?, attempt = ?, had_row = 0, body = NULL,'
                " content_type = NULL, prev_uow = NULL WHERE uow = ?"
            ),
            (ROLLED_BACK, max(attempt, uow.attempt), uow.id),
        )

    def commit(self, cursor: Any, uow: UnitOfWork) -> None:
        """
        Forget the rollback data of C{uow}, in the caller's transaction.
        """
        cursor.execute(self._sql('DELETE FROM "{u}" WHERE uow = ?'), (uow.id,))

    def prune(self, cursor: Any, horizon: int) -> int:
        """
        Forget the rollback markers whose attempt is below C{horizon}, in
        the caller's transaction.

        @return: How many were forgotten.
        """
        cursor.execute(self._sql('DELETE FROM "{u}" WHERE state = ? AND attempt < ?'), (ROLLED_BACK, horizon))
        return int(cursor.rowcount)

    def read(self, cursor: Any, key: str) -> Document | None:
        """
        The current document under C{key}, if any.
        """
        cursor.execute(
            self._sql('SELECT body, content_type, uow FROM "{t}" WHERE key = ? AND body IS NOT NULL'),
            (key,),
        )
        row = cursor.fetchone()
        return None if row is None else Document(bytes(row[0]), row[1], row[2])
