"""
The contract of a spool backend and of a fail queue backend, as checks that
any backend must pass: the C{file} backends pass them, and so must one added
beside them (see L{apicontainer.storage.SPOOL_BACKENDS}).

Each check is an C{async} function given a maker, which builds the backend
anew over the same durable place each time it is called: a second call is a
restart. A fail queue check is also given the L{Clock} its queue reads.
"""

from __future__ import annotations

import inspect
from typing import Awaitable, Callable

from attrs import evolve
from twisted.internet.task import Clock

from ..interfaces import IFailQueue
from ..storage import FailedUOW, SpoolBackend, StateRecord
from ..uow import Report, Status, UnitOfWork, Verdict
from ._contract import contractUOW

SpoolMaker = Callable[[], SpoolBackend]
# A shared fail queue is ready only once connected: its maker may be async.
FailQueueMaker = Callable[[], IFailQueue | Awaitable[IFailQueue]]


async def _made(make: FailQueueMaker) -> IFailQueue:
    queue = make()
    if inspect.isawaitable(queue):
        queue = await queue
    assert not inspect.isawaitable(queue)
    return queue


async def _gone(backend: SpoolBackend, uowId: int) -> bool:
    try:
        await backend.spool.load(uowId)
    except FileNotFoundError:
        return True
    return False


async def openSpool(backend: SpoolBackend) -> SpoolBackend:
    """
    Open C{backend} as the server does at start.
    """
    backend.spool.open()
    backend.ids.open()
    backend.states.open()
    await backend.journal.start()
    return backend


async def _spooled(
    backend: SpoolBackend, key: str = "/items/1", body: bytes = b"body", idempotencyKey: str | None = None
) -> UnitOfWork:
    uowId = await backend.ids.allocate()
    uow = evolve(contractUOW(uowId, body, key), idempotencyKey=idempotencyKey)
    return await backend.journal.write(uow)


def _stored(uow: UnitOfWork, at: float = 1.0) -> StateRecord:
    return StateRecord.of(Status.stored, Report.fromVerdicts(uow, {"a": Verdict.stored()}), uow.route, at, uow)


async def checkWriteThenLoad(make: SpoolMaker) -> None:
    """
    A UOW written through the journal loads back whole, under its id.
    """
    backend = await openSpool(make())
    try:
        uow = await _spooled(backend, body=b"\x00body\xff" * 100)
        loaded = await backend.spool.load(uow.id)
        assert (loaded.id, loaded.method, loaded.key, loaded.route) == (uow.id, uow.method, uow.key, uow.route)
        assert (loaded.body, loaded.contentType) == (uow.body, uow.contentType)
    finally:
        await backend.journal.stop()


async def checkSettleRecordsThenRemoves(make: SpoolMaker) -> None:
    """
    Settling records the final state, which answers for the UOW, its key's
    newest stored UOW and its Idempotency-Key; with C{removeSpool} the UOW
    leaves the spool, without it the UOW stays (a fail queue entry's).
    """
    backend = await openSpool(make())
    try:
        first = await _spooled(backend, idempotencyKey="k-1")
        kept = await _spooled(backend, key="/items/2")
        assert await backend.journal.settle(_stored(first), True) is None
        record = await backend.states.get(first.id)
        assert record is not None and record.state is Status.stored and record.status == 200
        assert await backend.states.lastStored(first.key) == first.id
        replay = await backend.states.byIdempotencyKey("k-1")
        assert replay is not None and replay.uow == first.id
        assert await _gone(backend, first.id), "a settled UOW still loads"
        await backend.journal.settle(_stored(kept, at=2.0), False)
        assert (await backend.spool.load(kept.id)).key == kept.key
        await backend.spool.delete(kept.id)
        await backend.spool.delete(kept.id)  # one already gone is fine
        assert await _gone(backend, kept.id)
    finally:
        await backend.journal.stop()


async def checkIdsIncreaseAcrossRestarts(make: SpoolMaker) -> None:
    """
    UOW ids only grow, also across a restart.
    """
    backend = await openSpool(make())
    ids = [await backend.ids.allocate() for _ in range(5)]
    await backend.journal.stop()
    again = await openSpool(make())
    try:
        later = [await again.ids.allocate() for _ in range(5)]
    finally:
        await again.journal.stop()
    assert ids == sorted(set(ids)) and later == sorted(set(later)) and later[0] > ids[-1]


async def checkSurvivesRestart(make: SpoolMaker) -> None:
    """
    What was spooled and what was settled are there after a restart.
    """
    backend = await openSpool(make())
    pending = await _spooled(backend, body=b"pending")
    settled = await _spooled(backend, key="/items/2")
    await backend.journal.settle(_stored(settled), True)
    await backend.journal.stop()
    again = await openSpool(make())
    try:
        assert (await again.spool.load(pending.id)).body == b"pending"
        assert await _gone(again, settled.id)
        record = await again.states.get(settled.id)
        assert record is not None and record.state is Status.stored
        assert await again.states.finalIds([pending.id, settled.id]) == {settled.id}
    finally:
        await again.journal.stop()


SPOOL_CONTRACT: dict[str, Callable[[SpoolMaker], Awaitable[None]]] = {
    "writeThenLoad": checkWriteThenLoad,
    "settleRecordsThenRemoves": checkSettleRecordsThenRemoves,
    "idsIncreaseAcrossRestarts": checkIdsIncreaseAcrossRestarts,
    "survivesRestart": checkSurvivesRestart,
}


def _failure(uowId: int, status: int = 503, key: str = "/items/1") -> Report:
    uow = contractUOW(uowId, b"body", key)
    return Report.fromVerdicts(uow, {"a": Verdict.failed(status, "down")})


async def checkScheduleAndTake(make: FailQueueMaker, clock: Clock) -> None:
    """
    A failed UOW is queued, due after the retry policy's delay (not
    before), taken once as retrying; its next failure counts on from it.
    """
    queue = await _made(make)
    queue.open()
    entry = queue.failed(_failure(7), "/items/<id>")
    assert (entry.state, entry.attempts, entry.uow) == (Status.queued, 1, 7)
    assert entry.nextAttemptAt is not None and entry.nextAttemptAt > clock.seconds()
    await queue.put(entry)
    assert queue.get(7) == entry and queue.list(Status.queued) == [entry] and queue.list(Status.parked) == []
    assert await queue.takeDue() == []
    clock.advance(entry.nextAttemptAt - clock.seconds())
    [taken] = await queue.takeDue()
    assert (taken.uow, taken.state) == (7, Status.retrying)
    assert await queue.takeDue() == [] and await queue.markRetrying(7) is None
    again = queue.failed(_failure(7), "/items/<id>")
    assert (again.attempts, again.firstFailedAt) == (2, entry.firstFailedAt)


async def checkParkAndStick(make: FailQueueMaker, clock: Clock) -> None:
    """
    After C{max_attempts} a UOW is parked, or stuck when only its rollback
    was retried; neither is ever due.
    """
    queue = await _made(make)
    queue.open()
    for _ in range(queue.retry.maxAttempts):
        entry = queue.failed(_failure(3), "/items/<id>")
        await queue.put(entry)
    assert (entry.state, entry.nextAttemptAt) == (Status.parked, None)
    for _ in range(queue.retry.maxAttempts):
        stuck = queue.failed(_failure(4, 500, "/items/4"), "/items/<id>", ("a",), compensate=True)
        await queue.put(stuck)
    assert (stuck.state, stuck.rollbackFailed, stuck.compensate) == (Status.stuck, ("a",), True)
    clock.advance(10**9)
    assert await queue.takeDue() == []
    assert [e.uow for e in queue.list()] == [3, 4]


async def checkDrop(make: FailQueueMaker, clock: Clock) -> None:
    """
    Dropping forgets an entry durably and gives it back; dropping one that
    is not there gives L{None}.
    """
    queue = await _made(make)
    queue.open()
    entry = queue.failed(_failure(9), "/items/<id>")
    await queue.put(entry)
    assert await queue.drop(9) == entry
    assert queue.get(9) is None and await queue.drop(9) is None
    again = await _made(make)
    again.open()
    assert again.get(9) is None


async def checkSurvivesRestartAndRetriesAgain(make: FailQueueMaker, clock: Clock) -> None:
    """
    Entries are there after a restart, whole; one whose attempt was under
    way when the server stopped is due again (at once on a queue one server
    owns; after its lease on a shared one, whose other servers may be
    working on it).
    """
    queue = await _made(make)
    queue.open()
    waiting = queue.failed(_failure(1), "/items/<id>")
    underWay = queue.failed(_failure(2, key="/items/2"), "/items/<id>", ("a",))
    await queue.put(waiting)
    await queue.put(underWay)
    taken = await queue.markRetrying(2)
    assert taken is not None
    await queue.put(taken)
    again = await _made(make)
    assert list(again.open()) == []
    assert again.get(1) == waiting
    restored = again.get(2)
    assert isinstance(restored, FailedUOW)
    assert (restored.rollbackFailed, restored.attempts) == (("a",), 1)
    clock.advance(10**6)
    assert sorted(entry.uow for entry in await again.takeDue()) == [1, 2]


FAILQUEUE_CONTRACT: dict[str, Callable[[FailQueueMaker, Clock], Awaitable[None]]] = {
    "scheduleAndTake": checkScheduleAndTake,
    "parkAndStick": checkParkAndStick,
    "drop": checkDrop,
    "survivesRestartAndRetriesAgain": checkSurvivesRestartAndRetriesAgain,
}
