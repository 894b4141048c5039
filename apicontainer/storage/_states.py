"""
The durable record of what became of each UOW.

The spool file is the durable record of a UOW that is received or being
applied; the fail queue holds the ones waiting for a retry. When a UOW
reaches a final state (stored, rejected, superseded, dropped) that state is
written here, with the key's newest stored UOW and the UOW's
C{Idempotency-Key}, before its spool file is deleted and before the client
is answered. So after a crash the server knows, for every UOW, whether it is
done, waiting, or must be re-driven.

Records from concurrent UOWs share one SQLite transaction and one fsync
(group commit): while one batch is being written, the next one gathers.
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any, Callable, Sequence, TypeVar

from attrs import frozen
from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

from ..blocking import Blocking
from ..uow import Report, Status, UnitOfWork
from ._groupcommit import GroupCommit, Operation, Result, each
from ._transactions import immediate

T = TypeVar("T")


@frozen
class StateRecord:
    """
    The final state of one UOW.

    @ivar report: The last report (L{apicontainer.uow.Report.asRecord}), or
        L{None} when there was none (dropped before any attempt).
    @ivar status: The HTTP status its client was, or would be, answered.
    """

    uow: int
    key: str
    route: str
    state: Status
    status: int
    report: dict[str, Any] | None
    idempotencyKey: str | None
    payloadHash: str | None
    at: float

    @classmethod
    def of(
        cls,
        state: Status,
        report: Report,
        route: str,
        at: float,
        uow: UnitOfWork | None = None,
    ) -> StateRecord:
        """
        The record of a UOW ending in C{state} with its last C{report}; with
        the UOW (when its spool file could be read), also its
        C{Idempotency-Key} and payload digest, so that repeats get answered.
        """
        key = uow.idempotencyKey if uow is not None else None
        return cls(
            uow=report.uow,
            key=report.key,
            route=route,
            state=state,
            status=report.status,
            report=report.asRecord(),
            idempotencyKey=key,
            payloadHash=uow.payloadHash() if uow is not None and key else None,
            at=at,
        )

    def asJSON(self) -> dict[str, Any]:
        """
        The record as the admin API shows it.
        """
        return {
            "uow": self.uow,
            "key": self.key,
            "route": self.route,
            "state": self.state.value,
            "status": self.status,
            "report": self.report,
            "finished_at": self.at,
        }


_COLUMNS = "uow, key, route, state, status, report, idempotency_key, payload_hash, at"


def _record(row: tuple[Any, ...]) -> StateRecord:
    return StateRecord(
        uow=row[0],
        key=row[1],
        route=row[2],
        state=Status(row[3]),
        status=row[4],
        report=json.loads(row[5]) if row[5] else None,
        idempotencyKey=row[6],
        payloadHash=row[7],
        at=row[8],
    )


class StateStore:
    """
    Final UOW states in an embedded SQLite database, written with group
    commit through a serial runner.
    """

    def __init__(self, path: Path, blocking: Blocking) -> None:
        self.path = path
        self._blocking = blocking
        self._connection: sqlite3.Connection | None = None
        self._group = GroupCommit(blocking, self.runBatch)

    def open(self) -> None:
        """
        Open or create the database (blocking; at start-up).
        """
        try:
            connection = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            connection.execute("PRAGMA journal_mode=WAL")
        except sqlite3.Error as e:
            raise sqlite3.OperationalError(f"{e}: {self.path}") from e
        connection.execute("PRAGMA synchronous=FULL")
        connection.execute(
            "CREATE TABLE IF NOT EXISTS uows (uow INTEGER PRIMARY KEY, key TEXT NOT NULL,"
            " route TEXT NOT NULL, state TEXT NOT NULL, status INTEGER NOT NULL, report TEXT,"
            " idempotency_key TEXT, payload_hash TEXT, at REAL NOT NULL)"
        )
        connection.execute(
            "CREATE INDEX IF NOT EXISTS uows_idempotency ON uows (idempotency_key)"
            " WHERE idempotency_key IS NOT NULL"
        )
        connection.execute("CREATE INDEX IF NOT EXISTS uows_at ON uows (at)")
        connection.execute(
            "CREATE TABLE IF NOT EXISTS keys (key TEXT PRIMARY KEY, uow INTEGER NOT NULL)"
        )
        self._connection = connection

    def close(self) -> None:
        """
        Close the database (blocking).
        """
        if self._connection is not None:
            self._connection.close()
            self._connection = None

    def _db(self) -> sqlite3.Connection:
        if self._connection is None:
            raise sqlite3.OperationalError("the state store is not open")
        return self._connection

    def record(self, record: StateRecord, then: Callable[[], T] | None = None) -> Deferred[T | None]:
        """
        Write C{record} durably, in the next batch.

        @param then: A blocking call to make once the record is durable, in
            the same thread-pool hop (the removal of the UOW's spool file):
            it saves the hop a call of its own would take.
        @return: A Deferred that fires once the batch holding it is
            committed, with what C{then} returned; it fails with the
            record's error, or with C{then}'s (the record is durable then).
        """
        return self._group.submit(self.insertNow, record, then)

    def runBatch(self, operations: Sequence[Operation]) -> list[Result]:
        db = self._db()
        with immediate(db):
            outcomes = each(operations, lambda operation: operation[0](db, *operation[1]))
        # Now that the records are durable, what follows each of them.
        for index, (_, (_, then)) in enumerate(operations):
            if then is not None and outcomes[index][0]:
                try:
                    outcomes[index] = (True, then())
                except Exception:
                    outcomes[index] = (False, Failure())
        return outcomes

    def insertNow(self, db: sqlite3.Connection, r: StateRecord, then: object) -> None:
        # C{then} rides along for runBatch, which calls it after the commit.
        db.execute(
            f"INSERT OR REPLACE INTO uows ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                r.uow,
                r.key,
                r.route,
                r.state.value,
                r.status,
                json.dumps(r.report) if r.report is not None else None,
                r.idempotencyKey,
                r.payloadHash,
                r.at,
            ),
        )
        if r.state is Status.stored:
            db.execute(
                "INSERT INTO keys (key, uow) VALUES (?, ?) ON CONFLICT (key)"
                " DO UPDATE SET uow = max(uow, excluded.uow)",
                (r.key, r.uow),
            )

    def get(self, uowId: int) -> Deferred[StateRecord | None]:
        """
        The final state of C{uowId}, if it has one.
        """

        def read() -> StateRecord | None:
            row = self._db().execute(f"SELECT {_COLUMNS} FROM uows WHERE uow = ?", (uowId,)).fetchone()
            return None if row is None else _record(row)

        return self._blocking(read)

    def byIdempotencyKey(self, key: str) -> Deferred[StateRecord | None]:
        """
        The finished UOW that was sent with C{Idempotency-Key: key}, if any.
        """

        def read() -> StateRecord | None:
            row = self._db().execute(
                f"SELECT {_COLUMNS} FROM uows WHERE idempotency_key = ? ORDER BY uow LIMIT 1", (key,)
            ).fetchone()
            return None if row is None else _record(row)

        return self._blocking(read)

    def lastStored(self, key: str) -> Deferred[int | None]:
        """
        The newest UOW stored on C{key}, if any.
        """

        def read() -> int | None:
            row = self._db().execute("SELECT uow FROM keys WHERE key = ?", (key,)).fetchone()
            return None if row is None else int(row[0])

        return self._blocking(read)

    def finalIds(self, uowIds: list[int]) -> Deferred[set[int]]:
        """
        Which of C{uowIds} have a final state.
        """

        def read() -> set[int]:
            found: set[int] = set()
            db = self._db()
            for start in range(0, len(uowIds), 500):
                chunk = uowIds[start : start + 500]
                marks = ", ".join("?" * len(chunk))
                found.update(r[0] for r in db.execute(f"SELECT uow FROM uows WHERE uow IN ({marks})", chunk))
            return found

        return self._blocking(read)

    def purge(self, before: float) -> Deferred[int]:
        """
        Forget final states recorded before C{before} (the newest stored UOW
        of each key is kept).

        @return: How many were forgotten.
        """

        def delete() -> int:
            with immediate(self._db()) as db:
                count = db.execute("DELETE FROM uows WHERE at < ?", (before,)).rowcount
            return int(count)

        return self._blocking(delete)
