"""
The redis stash against a real Redis: the stash contract, random
interleavings, atomicity of the scripts, and an outage of a throwaway server.
"""

from __future__ import annotations

import uuid
from typing import Any

import pytest
import pytest_twisted

from apicontainer.stashes._redis import RedisStash, parseURL
from apicontainer.testing import (
    CONTRACT,
    checkInterleaving,
    checkPruneForgetsOnlyOldMarkers,
    contractUOW,
    randomInterleavings,
)
from apicontainer.uow import VerdictKind

from tests.services import REDIS, ThrowawayRedis, require

URL = f"redis://{REDIS[0]}:{REDIS[1]}/0"


async def started(url: str = URL, timeout: float = 5.0) -> RedisStash:
    stash = RedisStash("cache", url, prefix=f"test-{uuid.uuid4().hex[:10]}:", timeout=timeout)
    await stash.start()
    return stash


async def cleanUp(stash: RedisStash) -> None:
    keys = await stash._redis.keys(stash.prefix + "*")
    if keys:
        await stash._redis.delete(keys)
    await stash.stop()


@pytest.fixture
def shared() -> None:
    require("Redis", *REDIS)


@pytest.mark.parametrize("check", list(CONTRACT.values()), ids=list(CONTRACT))
@pytest_twisted.ensureDeferred
async def test_contract(shared: None, check: Any) -> None:
    """
    The redis stash keeps each rule of the stash contract.
    """
    stash = await started()
    try:
        await check(stash)
    finally:
        await cleanUp(stash)


@pytest_twisted.ensureDeferred
async def test_prune(shared: None) -> None:
    """
    The redis stash forgets only the rollback markers below the horizon.
    """
    stash = await started()
    try:
        await checkPruneForgetsOnlyOldMarkers(stash)
    finally:
        await cleanUp(stash)


@pytest_twisted.ensureDeferred
async def test_interleavings(shared: None) -> None:
    """
    Random interleavings give the verdicts and documents of the reference.
    """
    for operations in randomInterleavings(60, seed=6379):
        stash = await started()
        try:
            await checkInterleaving(stash, operations)
        finally:
            await cleanUp(stash)


@pytest_twisted.ensureDeferred
async def test_layoutAndBinaryBodies(shared: None) -> None:
    """
    A binary body round-trips; the write and its undo record are hashes;
    commit removes the undo record.
    """
    stash = await started()
    try:
        body = bytes(range(256))
        first = contractUOW(1, body)
        await stash.stash(first)
        document = await stash.read("/items/1")
        assert (document.body, document.contentType, document.uow) == (body, "text/plain", 1)
        assert await stash._redis.hget(f"{stash.prefix}undo:1", "state") == b"prepared"
        await stash.commit(first)
        assert await stash._redis.exists(f"{stash.prefix}undo:1") in (0, False)
    finally:
        await cleanUp(stash)


def test_parseURL() -> None:
    """
    URLs give host, port, database and credentials; others are refused.
    """
    assert parseURL("redis://u:p%40ss@h:7000/3") == {"host": "h", "port": 7000, "dbid": 3, "password": "p@ss", "username": "u"}
    assert parseURL("redis://h")["port"] == 6379
    for bad in ("http://h", "redis://", "redis://h/x"):
        with pytest.raises(ValueError):
            parseURL(bad)


@pytest.mark.process
@pytest_twisted.ensureDeferred
async def test_outageIs503AndRecovers() -> None:
    """
    With its server killed, the stash answers 503 verdicts (within its
    timeout); restarted, the stash stores again.
    """
    server = ThrowawayRedis()
    try:
        stash = await started(f"redis://127.0.0.1:{server.port}/0", timeout=1.0)
        assert (await stash.stash(contractUOW(1, b"one"))).kind is VerdictKind.stored
        server.kill()
        verdict = await stash.stash(contractUOW(2, b"down"))
        assert (verdict.kind, verdict.status) == (VerdictKind.failed, 503)
        server.start()
        for attempt in range(50):
            verdict = await stash.stash(contractUOW(3, b"back"))
            if verdict.kind is VerdictKind.stored:
                break
        assert verdict.kind is VerdictKind.stored
        assert (await stash.read("/items/1")).body == b"back"
        await stash.stop()
    finally:
        server.destroy()


@pytest_twisted.ensureDeferred
async def test_secondNumberingRefused(shared: None) -> None:
    """
    A prefix written by the UOWs of one data directory refuses those of
    another, in one line that names the prefix and says why, and stores
    nothing of them; the first, restarted, still writes it.
    """
    prefix = f"test-{uuid.uuid4().hex[:10]}:"
    first = RedisStash("cache", URL, prefix=prefix, numbering=lambda: "one")
    await first.start()
    second = RedisStash("cache2", URL, prefix=prefix, numbering=lambda: "two")
    await second.start()
    try:
        assert (await first.stash(contractUOW(5, key="/k"))).kind is VerdictKind.stored
        await first.commit(contractUOW(5, key="/k"))
        verdict = await second.stash(contractUOW(9, b"theirs", key="/k"))
        assert (verdict.kind, verdict.status) == (VerdictKind.failed, 503)
        detail = verdict.detail or ""
        assert "\n" not in detail
        assert f"stash cache2: prefix {prefix} holds writes numbered by another api-container data directory" in detail
        assert "(one; this one is two)" in detail
        assert (await first.read("/k")).uow == 5  # type: ignore[union-attr]
        again = RedisStash("cache", URL, prefix=prefix, numbering=lambda: "one")
        await again.start()
        assert (await again.stash(contractUOW(6, key="/k"))).kind is VerdictKind.stored
        await again.stop()
    finally:
        await second.stop()
        await cleanUp(first)
