"""
SQLite write transactions that end, whatever fails.
"""

from __future__ import annotations

import sqlite3
from contextlib import contextmanager
from typing import Iterator


@contextmanager
def immediate(db: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """
    Run the block in a write transaction (C{BEGIN IMMEDIATE}) on C{db}, a
    connection in autocommit mode; commit at its end, or roll back if the
    block or the commit fails.

    SQLite keeps the transaction open when its C{COMMIT} fails (on a full
    disk: C{SQLITE_FULL}), and every later C{BEGIN} on the connection would
    fail with it: the rollback ends it, so the connection works again once
    the cause is gone.
    """
    db.execute("BEGIN IMMEDIATE")
    try:
        yield db
        db.execute("COMMIT")
    except BaseException:
        if db.in_transaction:
            try:
                db.execute("ROLLBACK")
            except sqlite3.Error:
                pass  # the error that brought us here is the one to report
        raise
