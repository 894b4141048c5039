"""
SQLite write transactions end even when their commit fails.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from apicontainer.storage._transactions import immediate


class ImmediateTests(SynchronousTestCase):
    def connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(Path(self.mktemp()), isolation_level=None)
        self.addCleanup(db.close)
        db.execute("CREATE TABLE t (v INTEGER)")
        return db

    def test_commits(self) -> None:
        """
        The block's writes are committed at its end.
        """
        db = self.connect()
        with immediate(db):
            db.execute("INSERT INTO t VALUES (1)")
        self.assertFalse(db.in_transaction)
        self.assertEqual(db.execute("SELECT v FROM t").fetchall(), [(1,)])

    def test_failedBlockRollsBack(self) -> None:
        """
        An error in the block rolls its writes back and goes on up.
        """
        db = self.connect()
        with self.assertRaises(ZeroDivisionError):
            with immediate(db):
                db.execute("INSERT INTO t VALUES (1)")
                1 / 0
        self.assertEqual((db.in_transaction, db.execute("SELECT v FROM t").fetchall()), (False, []))

    def test_failedCommitEndsTheTransaction(self) -> None:
        """
        A COMMIT that fails (a deferred constraint here; a full disk in
        production) leaves the transaction open in SQLite: the helper rolls
        it back, so the next transaction on the connection can begin.
        """
        db = self.connect()
        db.execute("CREATE TABLE parent (id INTEGER PRIMARY KEY)")
        db.execute(
            "CREATE TABLE child (p INTEGER REFERENCES parent (id) DEFERRABLE INITIALLY DEFERRED)"
        )
        db.execute("PRAGMA foreign_keys = ON")
        with self.assertRaises(sqlite3.IntegrityError):
            with immediate(db):
                db.execute("INSERT INTO child VALUES (7)")
        self.assertFalse(db.in_transaction)
        with immediate(db):
            db.execute("INSERT INTO t VALUES (2)")
        self.assertEqual(db.execute("SELECT v FROM t").fetchall(), [(2,)])
