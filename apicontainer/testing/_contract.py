"""
The stash contract: every rule of L{IStash} as an C{async} check, random
interleavings against the reference stash, and L{StashContractTests}.
"""

from __future__ import annotations

import random
from typing import Any, Callable
from unittest import SkipTest

from twisted.internet.defer import Deferred

from ..interfaces import IBatchStash, IPrunable, IReader, IStash
from ..uow import UnitOfWork
from ._memory import MemoryStash


def contractUOW(
    uowId: int, body: bytes | None = b"body", key: str = "/items/1", attempt: int | None = None
) -> UnitOfWork:
    """
    A UOW of the contract checks: writing C{body} to C{key}, or deleting it
    when C{body} is L{None}; its first attempt unless C{attempt} is given.
    """
    return UnitOfWork(
        id=uowId,
        method="DELETE" if body is None else "PUT",
        key=key,
        route="/items/<id>",
        body=body or b"",
        contentType=None if body is None else "text/plain",
        attempt=uowId if attempt is None else attempt,
    )


async def _read(stash: Any, key: str = "/items/1") -> bytes | None:
    document = await stash.read(key)
    return None if document is None else document.body


async def _kind(stash: Any, uow: UnitOfWork) -> str:
    verdict = await stash.stash(uow)
    return verdict.kind.value  # type: ignore[no-any-return]


async def checkInterfaces(stash: Any) -> None:
    """
    The stash provides IStash (and IReader, which the contract reads by).
    """
    from zope.interface.verify import verifyObject

    assert verifyObject(IStash, stash)
    assert verifyObject(IReader, stash)


async def checkStashThenCommitIsPermanent(stash: Any) -> None:
    """
    A stored and committed write stays; a rollback after the commit changes
    nothing.
    """
    uow = contractUOW(1, b"one")
    assert await _kind(stash, uow) == "stored"
    await stash.commit(uow)
    await stash.rollback(uow)
    assert await _read(stash) == b"one"


async def checkRollbackRestoresAbsence(stash: Any) -> None:
    """
    Rolling back the first write of a key leaves the key absent.
    """
    uow = contractUOW(1, b"one")
    await stash.stash(uow)
    assert await _read(stash) == b"one"
    await stash.rollback(uow)
    assert await _read(stash) is None


async def checkRollbackRestoresPreviousValue(stash: Any) -> None:
    """
    Rolling back a write restores the value it replaced.
    """
    first, second = contractUOW(1, b"one"), contractUOW(2, b"two")
    await stash.stash(first)
    await stash.commit(first)
    await stash.stash(second)
    assert await _read(stash) == b"two"
    await stash.rollback(second)
    assert await _read(stash) == b"one"


async def checkRollbackOfDeleteRestores(stash: Any) -> None:
    """
    A delete hides the document; its rollback brings it back.
    """
    first, delete = contractUOW(1, b"one"), contractUOW(2, None)
    await stash.stash(first)
    await stash.commit(first)
    assert await _kind(stash, delete) == "stored"
    assert await _read(stash) is None
    await stash.rollback(delete)
    assert await _read(stash) == b"one"


async def checkRollbackIsIdempotent(stash: Any) -> None:
    """
    A second rollback of the same UOW changes nothing.
    """
    first, second = contractUOW(1, b"one"), contractUOW(2, b"two")
    await stash.stash(first)
    await stash.commit(first)
    await stash.stash(second)
    await stash.rollback(second)
    await stash.rollback(second)
    assert await _read(stash) == b"one"


async def checkRollbackBeforeLateStash(stash: Any) -> None:
    """
    A rollback that arrives before its stash leaves nothing behind once the
    late stash arrives.
    """
    uow = contractUOW(1, b"one")
    await stash.rollback(uow)
    assert await _kind(stash, uow) == "declined"
    assert await _read(stash) is None


async def checkRetryAfterRollbackStores(stash: Any) -> None:
    """
    A later attempt of a rolled-back UOW stores again.
    """
    await stash.stash(contractUOW(1, b"one"))
    await stash.rollback(contractUOW(1, b"one"))
    retry = contractUOW(1, b"one", attempt=7)
    assert await _kind(stash, retry) == "stored"
    await stash.commit(retry)
    assert await _read(stash) == b"one"


async def checkRollbackOfLaterAttemptBlocksIt(stash: Any) -> None:
    """
    A rollback sent for a later attempt (whose stash call has not arrived)
    blocks that attempt's late stash too.
    """
    await stash.stash(contractUOW(1, b"one"))
    await stash.rollback(contractUOW(1, b"one", attempt=9))
    assert await _read(stash) is None
    assert await _kind(stash, contractUOW(1, b"one", attempt=9)) == "declined"
    assert await _read(stash) is None


async def checkReplayStoresOnce(stash: Any) -> None:
    """
    Replaying a stored UOW stores nothing more: its rollback still restores
    the value before it.
    """
    first, second = contractUOW(1, b"one"), contractUOW(2, b"two")
    await stash.stash(first)
    await stash.commit(first)
    await stash.stash(second)
    assert await _kind(stash, second) == "stored"
    await stash.rollback(second)
    assert await _read(stash) == b"one"


async def checkOlderNeverOverwritesNewer(stash: Any) -> None:
    """
    A UOW older than the one that wrote the current value is declined and
    changes nothing, also after a delete.
    """
    newer = contractUOW(5, b"new")
    await stash.stash(newer)
    await stash.commit(newer)
    assert await _kind(stash, contractUOW(3, b"old")) == "declined"
    assert await _read(stash) == b"new"
    delete = contractUOW(6, None)
    await stash.stash(delete)
    await stash.commit(delete)
    assert await _kind(stash, contractUOW(4, b"old")) == "declined"
    assert await _read(stash) is None


async def checkRollbackNeverClobbersLaterWrite(stash: Any) -> None:
    """
    Rolling back a UOW whose write a later UOW replaced keeps the later
    write; rolling that one back then restores the value before both.
    """
    base, first, second = contractUOW(1, b"base"), contractUOW(2, b"one"), contractUOW(3, b"two")
    await stash.stash(base)
    await stash.commit(base)
    await stash.stash(first)
    await stash.stash(second)
    await stash.rollback(first)
    assert await _read(stash) == b"two"
    await stash.rollback(second)
    assert await _read(stash) == b"base"


async def checkKeysAreIndependent(stash: Any) -> None:
    """
    A rollback on one key leaves another key alone.
    """
    a, b = contractUOW(1, b"a", key="/items/a"), contractUOW(2, b"b", key="/items/b")
    await stash.stash(a)
    await stash.stash(b)
    await stash.rollback(a)
    assert await _read(stash, "/items/a") is None
    assert await _read(stash, "/items/b") == b"b"


async def checkRefusalStoresNothing(stash: Any, refuse: Callable[[Any], None]) -> None:
    """
    A write that the stash refuses with a 4xx leaves the document as it was:
    the pipeline never calls the rollback of a stash that refused, so a
    refusal must store nothing.

    @param refuse: Makes C{stash} refuse its next write with a 4xx.
    """
    await stash.stash(contractUOW(1, b"one"))
    await stash.commit(contractUOW(1, b"one"))
    refuse(stash)
    verdict = await stash.stash(contractUOW(2, b"two"))
    assert verdict.refused, f"told to refuse, the stash answered {verdict}"
    assert await _read(stash) == b"one", "a refused write changed the document"


async def checkPruneForgetsOnlyOldMarkers(stash: Any) -> None:
    """
    C{prune(horizon)} forgets the rollback markers whose attempt is below
    the horizon (a late stash of one then stores again), and keeps newer
    markers, also of an older UOW rolled back in a later attempt, and the
    rollback data of stored UOWs.
    """
    await stash.rollback(contractUOW(1, b"one", key="/items/a"))
    await stash.rollback(contractUOW(2, b"two", key="/items/d", attempt=9))
    await stash.stash(contractUOW(3, b"three", key="/items/b"))
    await stash.rollback(contractUOW(5, b"five", key="/items/c"))
    await stash.prune(4)
    assert await _kind(stash, contractUOW(5, b"five", key="/items/c")) == "declined", "a newer marker went"
    late = contractUOW(2, b"two", key="/items/d", attempt=9)
    assert await _kind(stash, late) == "declined", "the marker of a recent attempt went"
    await stash.rollback(contractUOW(3, b"three", key="/items/b"))
    assert await _read(stash, "/items/b") is None, "the rollback data of a stored UOW went"
    assert await _kind(stash, contractUOW(1, b"one", key="/items/a")) == "stored", "the old marker stayed"


async def checkBatchIsEachAlone(stash: Any) -> None:
    """
    A stash that takes batches (L{IBatchStash}) gives each UOW of a batch
    the verdict the reference gives it alone (stored, already stored,
    superseded, rolled back before it arrived), and commits and rolls back
    each of them as if it had come alone.
    """
    reference = MemoryStash("reference")
    setup = (("stash", 1, "a"), ("commit", 1, "a"), ("stash", 7, "c"), ("rollback", 8, "d"), ("stash", 9, "e"))
    for operation, uowId, key in setup:
        for each in (reference, stash):
            await getattr(each, operation)(contractUOW(uowId, b"%d" % uowId, key=f"/items/{key}"))
    batch = [
        contractUOW(uowId, None if key == "f" else b"%d" % uowId, key=f"/items/{key}")
        for uowId, key in ((2, "a"), (6, "c"), (3, "b"), (8, "d"), (9, "e"), (10, "f"))
    ]
    expected = [(await reference.stash(uow)).kind.value for uow in batch]
    got = [verdict.kind.value for verdict in await stash.stashBatch(batch)]
    assert got == expected, f"batch verdicts {got}, each alone {expected}"
    outcomes = await stash.commitBatch([batch[0], batch[4]])
    assert list(outcomes) == [None, None], f"a commit of the batch failed: {outcomes}"
    await stash.rollback(batch[2])
    await stash.rollback(batch[0])
    for key, body in (("/items/a", b"2"), ("/items/b", None), ("/items/c", b"7"), ("/items/e", b"9")):
        assert await _read(stash, key) == body, f"{key} holds {await _read(stash, key)!r}, not {body!r}"


BATCH_CONTRACT = {check.__name__[len("check") :]: check for check in (checkBatchIsEachAlone,)}
"""
The rules of L{IBatchStash}, by name, as L{CONTRACT}'s checks, for a stash
that provides it.
"""


CONTRACT = {
    check.__name__[len("check") :]: check
    for check in (
        checkInterfaces,
        checkStashThenCommitIsPermanent,
        checkRollbackRestoresAbsence,
        checkRollbackRestoresPreviousValue,
        checkRollbackOfDeleteRestores,
        checkRollbackIsIdempotent,
        checkRollbackBeforeLateStash,
        checkRetryAfterRollbackStores,
        checkRollbackOfLaterAttemptBlocksIt,
        checkReplayStoresOnce,
        checkOlderNeverOverwritesNewer,
        checkRollbackNeverClobbersLaterWrite,
        checkKeysAreIndependent,
    )
}
"""
Every rule of L{IStash}, by name, as an C{async} check that takes a fresh,
started stash and raises C{AssertionError} if the stash breaks the rule.
"""

INTERLEAVING_KEYS = ("/items/0", "/items/1")


def interleavings() -> Any:
    """
    A Hypothesis strategy of operation sequences for L{checkInterleaving}:
    C{(operation, uow)} pairs over four UOWs on two keys (UOW 4 deletes),
    where C{operation} is stash, rollback, commit or retry (a new attempt).
    """
    from hypothesis import strategies

    return strategies.lists(
        strategies.tuples(
            strategies.sampled_from(["stash", "rollback", "commit", "retry"]),
            strategies.integers(min_value=1, max_value=4),
        ),
        max_size=24,
    )


def randomInterleavings(count: int, seed: int = 0) -> list[list[tuple[str, int]]]:
    """
    C{count} sequences like those of L{interleavings}, from a seeded random
    source: for tests on the reactor, where Hypothesis cannot drive them.
    """
    rng = random.Random(seed)
    operations = ["stash", "rollback", "commit", "retry"]
    return [
        [(rng.choice(operations), rng.randint(1, 4)) for _ in range(rng.randint(0, 24))]
        for _ in range(count)
    ]


async def checkInterleaving(stash: Any, operations: list[tuple[str, int]]) -> None:
    """
    Apply C{operations} to C{stash} and to a L{MemoryStash}, the reference,
    and check that they give the same verdicts and hold the same documents
    after every step.
    """
    reference = MemoryStash("reference")
    attempts = {uowId: uowId for uowId in range(1, 5)}
    for step, (operation, uowId) in enumerate(operations):
        if operation == "retry":
            attempts[uowId] = 100 * (step + 1) + uowId
            operation = "stash"
        uow = contractUOW(
            uowId,
            None if uowId == 4 else b"body-%d" % (uowId,),
            key=INTERLEAVING_KEYS[uowId % 2],
            attempt=attempts[uowId],
        )
        if operation == "stash":
            expected, got = await reference.stash(uow), await stash.stash(uow)
            assert got.kind == expected.kind, (step, operation, uowId, got, expected)
        else:
            await getattr(reference, operation)(uow)
            await getattr(stash, operation)(uow)
        for key in INTERLEAVING_KEYS:
            assert await _read(stash, key) == await _read(reference, key), (step, operation, uowId, key)


class StashContractTests:
    """
    The stash contract, as a mixin for a L{twisted.trial.unittest.SynchronousTestCase}.

    Mix it into a test case of your own and define C{makeStash()}, returning
    a fresh, started stash whose Deferreds fire synchronously (run its
    blocking calls with L{apicontainer.blocking.inline}); each check of
    L{CONTRACT} becomes a test, and C{test_interleavings} runs random
    sequences of operations against the reference (Hypothesis). For a stash
    that talks to a server, run the same L{CONTRACT} checks and
    L{checkInterleaving} from tests that wait on the reactor (pytest-twisted).
    """

    successResultOf: Any

    def makeStash(self) -> IStash:
        raise NotImplementedError("define makeStash() in your test case")

    def refuse(self, stash: Any) -> None:
        """
        Make C{stash} refuse its next write with a 4xx, for
        C{test_refusalStoresNothing}; that test is skipped unless a test
        case defines this.
        """
        raise NotImplementedError("define refuse() in your test case")

    def test_pruneForgetsOnlyOldMarkers(self) -> None:
        """
        A stash that keeps rollback markers (L{IPrunable}) forgets only
        those below the horizon.
        """
        stash = self.makeStash()
        if not IPrunable.providedBy(stash):
            raise SkipTest(f"{type(stash).__name__} does not provide IPrunable")
        self.successResultOf(Deferred.fromCoroutine(checkPruneForgetsOnlyOldMarkers(stash)))

    def test_batches(self) -> None:
        """
        A stash that takes batches (L{IBatchStash}) treats each UOW of a
        batch as if it came alone.
        """
        stash = self.makeStash()
        if not IBatchStash.providedBy(stash):
            raise SkipTest(f"{type(stash).__name__} does not provide IBatchStash")
        for check in BATCH_CONTRACT.values():
            self.successResultOf(Deferred.fromCoroutine(check(self.makeStash())))

    def test_refusalStoresNothing(self) -> None:
        """
        A write the stash refuses with a 4xx stores nothing (its rollback is
        never called).
        """
        if type(self).refuse is StashContractTests.refuse:
            raise SkipTest(f"{type(self).__name__} cannot make its stash refuse a write")
        self.runCheck(checkRefusalStoresNothing, self.refuse)

    def runCheck(self, check: Callable[..., Any], *args: Any) -> None:
        self.successResultOf(Deferred.fromCoroutine(check(self.makeStash(), *args)))

    def test_interleavings(self) -> None:
        """
        Random interleavings of stash, rollback, commit and retry give the
        verdicts and documents of the reference stash.
        """
        from hypothesis import HealthCheck, given, settings

        @settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck))
        @given(interleavings())
        def property(operations: list[tuple[str, int]]) -> None:
            self.runCheck(checkInterleaving, operations)

        property()


def _contractTest(check: Callable[..., Any]) -> Callable[[Any], None]:
    def test(self: Any) -> None:
        self.runCheck(check)

    test.__doc__ = check.__doc__
    return test


for _name, _check in CONTRACT.items():
    setattr(StashContractTests, f"test_{_name}", _contractTest(_check))
