"""
The postgres stash against a real PostgreSQL: the stash contract, random
interleavings, and an outage of a throwaway cluster.
"""

from __future__ import annotations

import uuid
from typing import Any

import psycopg
import pytest
import pytest_twisted
from twisted.internet import reactor

from apicontainer.stashes._postgres import PostgresStash
from apicontainer.testing import (
    CONTRACT,
    checkInterleaving,
    checkPruneForgetsOnlyOldMarkers,
    contractUOW,
    randomInterleavings,
)
from apicontainer.uow import VerdictKind

from tests.services import POSTGRES_DSN, ThrowawayPostgres, require


async def started(dsn: str = POSTGRES_DSN, table: str | None = None) -> PostgresStash:
    stash = PostgresStash("pg", dsn, reactor, table=table or f"t_{uuid.uuid4().hex[:12]}", poolSize=4)
    await stash.start()
    return stash


def drop(stash: PostgresStash) -> None:
    stash.stop()
    with psycopg.connect(POSTGRES_DSN, autocommit=True) as db:
        db.execute(f'DROP TABLE IF EXISTS "{stash.table}", "{stash.table}_undo", "{stash.table}_numbering"')


@pytest.fixture
def shared() -> None:
    require("PostgreSQL", "127.0.0.1", 5432)


@pytest.mark.parametrize("check", list(CONTRACT.values()), ids=list(CONTRACT))
@pytest_twisted.ensureDeferred
async def test_contract(shared: None, check: Any) -> None:
    """
    The postgres stash keeps each rule of the stash contract.
    """
    stash = await started()
    try:
        await check(stash)
    finally:
        drop(stash)


@pytest_twisted.ensureDeferred
async def test_prune(shared: None) -> None:
    """
    The postgres stash forgets only the rollback markers below the horizon.
    """
    stash = await started()
    try:
        await checkPruneForgetsOnlyOldMarkers(stash)
    finally:
        drop(stash)


@pytest_twisted.ensureDeferred
async def test_interleavings(shared: None) -> None:
    """
    Random interleavings of stash, rollback, commit and retry give the
    verdicts and documents of the reference stash.
    """
    for operations in randomInterleavings(40, seed=5432):
        stash = await started()
        try:
            await checkInterleaving(stash, operations)
        finally:
            drop(stash)


@pytest_twisted.ensureDeferred
async def test_rowsInTheDatabase(shared: None) -> None:
    """
    The write and its before-image are rows in the table and its undo table;
    commit forgets the undo row.
    """
    stash = await started()
    try:
        await stash.stash(contractUOW(1, b"one"))
        await stash.commit(contractUOW(1, b"one"))
        await stash.stash(contractUOW(2, b"two"))
        with psycopg.connect(POSTGRES_DSN) as db:
            rows = db.execute(f'SELECT key, body, uow FROM "{stash.table}"').fetchall()
            undo = db.execute(f'SELECT uow, state, body, prev_uow FROM "{stash.table}_undo"').fetchall()
        assert rows == [("/items/1", b"two", 2)]
        assert undo == [(2, "prepared", b"one", 1)]
    finally:
        drop(stash)


@pytest.mark.process
@pytest_twisted.ensureDeferred
async def test_outageIs503AndRecovers() -> None:
    """
    With its server stopped, the stash answers 503 verdicts; when the server
    is back, the pool reconnects and the stash stores again.
    """
    cluster = ThrowawayPostgres()
    try:
        stash = await started(cluster.dsn, "docs")
        assert (await stash.stash(contractUOW(1, b"one"))).kind is VerdictKind.stored
        cluster.stop()
        for uowId in (2, 3):
            verdict = await stash.stash(contractUOW(uowId, b"down"))
            assert (verdict.kind, verdict.status) == (VerdictKind.failed, 503)
        cluster.start()
        verdict = await stash.stash(contractUOW(4, b"back"))
        if verdict.kind is VerdictKind.failed:
            # The first call after the outage may still meet a dead pooled
            # connection; that one is discarded, and the next call works.
            verdict = await stash.stash(contractUOW(4, b"back"))
        assert verdict.kind is VerdictKind.stored
        document = await stash.read("/items/1")
        assert document is not None and document.body == b"back"
        stash.stop()
    finally:
        cluster.destroy()


@pytest_twisted.ensureDeferred
async def test_secondNumberingRefused(shared: None) -> None:
    """
    A table written by the UOWs of one data directory refuses those of
    another, in one line that names the table and says why, and stores
    nothing of them; the first, restarted, still writes it.
    """
    table = f"t_{uuid.uuid4().hex[:12]}"
    first = PostgresStash("pg", POSTGRES_DSN, reactor, table=table, numbering=lambda: "one")
    await first.start()
    try:
        assert (await first.stash(contractUOW(5, key="/k"))).kind is VerdictKind.stored
        await first.commit(contractUOW(5, key="/k"))
        second = PostgresStash("pg2", POSTGRES_DSN, reactor, table=table, numbering=lambda: "two")
        with pytest.raises(Exception) as refused:
            await second.start()
        message = str(refused.value)
        assert "\n" not in message
        assert f"stash pg2: table {table} holds writes numbered by another api-container data directory" in message
        assert "(one; this one is two)" in message
        verdict = await second.stash(contractUOW(9, b"theirs", key="/k"))
        assert (verdict.kind, verdict.status) == (VerdictKind.failed, 503)
        assert "another api-container data directory" in (verdict.detail or "")
        second.stop()
        assert (await first.read("/k")).uow == 5  # type: ignore[union-attr]
        again = PostgresStash("pg", POSTGRES_DSN, reactor, table=table, numbering=lambda: "one")
        await again.start()
        assert (await again.stash(contractUOW(6, key="/k"))).kind is VerdictKind.stored
        again.stop()
    finally:
        drop(first)
