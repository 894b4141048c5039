"""
Crash recovery: on start, before ingress opens, every spooled UOW without a
final state is settled.
"""

from __future__ import annotations

from collections import Counter

from twisted.internet.defer import Deferred, DeferredList, DeferredSemaphore
from twisted.logger import Logger

from ..interfaces import IFailQueue, ISpool
from ..storage import CorruptSpoolFile, StateStore
from ..uow import UnitOfWork
from ._fanout import Fanout
from ._frontqueue import Front
from ._idempotency import IdempotencyIndex

log = Logger(namespace="apicontainer.pipeline.recovery")


async def recover(
    spool: ISpool,
    states: StateStore,
    failQueue: IFailQueue,
    fanout: Fanout,
    front: Front,
    idempotency: IdempotencyIndex,
    window: int = 256,
) -> Counter[str]:
    """
    Settle what a crash left behind.

      - A spool file or fail queue entry whose UOW has a final state is a
        crash between recording that state and cleaning up: it is removed.
      - A UOW in the fail queue stays there, for the retry engine.
      - Every other spool file is re-driven through the fanout under a fresh
        attempt id, in UOW order (so per key in UOW order). Stashes are
        idempotent per UOW; one superseded by a newer UOW on its key is
        rolled back instead.
      - A corrupt spool file is quarantined and reported, never replayed.

    Run twice, the second run finds nothing to do.

    @param window: How many UOWs are loaded and under way at once.
    @return: Counts by what happened: the outcome of each re-driven UOW,
        C{cleaned}, C{quarantined}.
    """
    counts: Counter[str] = Counter()
    pending = await spool.scan()
    failed = [entry.uow for entry in failQueue.list()]
    final = await states.finalIds(sorted(set(pending) | set(failed)))
    for uowId in sorted(final):
        if failQueue.get(uowId) is not None:
            await failQueue.drop(uowId)
        if uowId in pending:
            await spool.delete(uowId)
        counts["cleaned"] += 1
    gate = DeferredSemaphore(window)
    settling: list[Deferred[object]] = []
    for uowId in pending:
        if uowId in final:
            continue
        try:
            uow = await spool.load(uowId)
        except CorruptSpoolFile:
            await spool.quarantine(uowId)
            counts["quarantined"] += 1
            continue
        idempotency.hold(uow)
        if failQueue.get(uowId) is not None:
            continue
        await gate.acquire()
        settling.append(Deferred.fromCoroutine(_redrive(uow, fanout, front, gate, counts)))
    await DeferredList(settling, consumeErrors=True)
    if counts:
        log.warn(
            "recovery: {summary}",
            summary=", ".join(f"{n} {what}" for what, n in sorted(counts.items())),
            counts=dict(counts),
        )
    return counts


async def _redrive(
    uow: UnitOfWork, fanout: Fanout, front: Front, gate: DeferredSemaphore, counts: Counter[str]
) -> None:
    try:
        attempt = await front.newAttempt(uow)
        report = await fanout.submit(attempt)
        counts[report.outcome.value] += 1
    except Exception:
        counts["unsettled"] += 1
        log.failure("recovery could not settle UOW {uow}", uow=uow.id)
    finally:
        gate.release()
