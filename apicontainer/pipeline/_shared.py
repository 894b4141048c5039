"""
The pipeline on a shared spool (C{spool.backend: jetstream}): the front
queue publishes, the partitions' consumers feed the fanout, and the report
of each UOW goes back to the instance whose client waits for it.
"""

from __future__ import annotations

import json
from typing import Any, cast

from attrs import evolve
from twisted.internet.defer import CancelledError, Deferred, DeferredQueue
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater
from twisted.logger import Logger

from ..interfaces import IFailQueue
from ..storage import (
    Duplicate,
    JetStreamLink,
    PartitionConsumers,
    SharedStates,
    SpoolUnavailable,
    Verdicts,
)
from ..uow import Report, UnitOfWork
from ._fanout import Fanout
from ._frontqueue import Admission
from ._idempotency import IdempotencyIndex, KeyConflict, Replay, _replayOf


def _report(data: bytes) -> Report:
    return Report.fromJSON(json.loads(data))


class SharedFront:
    """
    The front queue of a shared spool: a request is published to its key's
    partition, which gives it its UOW id; it reaches the fanout of whichever
    instance consumes it (L{SharedDelivery}), and its report comes back here.

    @ivar queue: Unused (the consumers feed the fanout); there for the
        fanout's loop.
    """

    log = Logger()

    def __init__(
        self,
        journal: Any,
        ids: Any,
        states: SharedStates,
        failQueue: IFailQueue,
        verdicts: Verdicts,
        clock: IReactorTime,
    ) -> None:
        self.queue: DeferredQueue[Admission] = DeferredQueue()
        self._journal = journal
        self._ids = ids
        self._states = states
        self._failQueue = failQueue
        self._clock = clock
        self.verdicts = verdicts

    async def admit(self, request: UnitOfWork) -> Admission:
        """
        Publish C{request}; with an C{Idempotency-Key}, record that the key
        is its UOW's.

        @raise apicontainer.storage.SpoolError: Nothing was spooled.
        @raise KeyConflict: The stream already had the key, for another
            request (422).
        """
        try:
            uow = await self._journal.write(evolve(request, id=0, attempt=0))
            first = True
        except Duplicate as d:
            uow, first = d.uow, False
        if uow.idempotencyKey is not None:
            payloadHash = uow.payloadHash()
            try:
                held = await self._states.claimKey(uow.idempotencyKey, payloadHash, uow.id)
            except Exception as e:
                # Spooled all the same: its settlement records the key, and
                # the stream knows it for its duplicate window meanwhile.
                self.log.warn("Idempotency-Key of UOW {uow} not recorded yet: {error}", uow=uow.id, error=str(e))
            else:
                if held[0] != payloadHash:
                    raise KeyConflict(422, "this Idempotency-Key was used for a different request")
        return Admission(uow, Deferred.fromCoroutine(self._outcome(uow.id, first)))

    async def _outcome(self, uowId: int, first: bool) -> Report:
        if not first:
            return await self._settled(uowId)
        waiting = self.verdicts.wait(uowId)
        try:
            return _report(await waiting)
        finally:
            if not waiting.called:
                waiting.cancel()

    async def _settled(self, uowId: int, every: float = 0.25) -> Report:
        """
        The report of a UOW another instance took the request of: its final
        state or fail queue entry, looked for until there is one (or the
        request's timeout cancels this).
        """
        while True:
            try:
                record = await self._states.get(uowId)
            except CancelledError:
                raise
            except Exception:
                record = None
            if record is not None and record.report is not None:
                return Report.fromJSON(record.report)
            entry = self._failQueue.get(uowId)
            if entry is not None:
                return entry.report
            await deferLater(self._clock, every, lambda: None)

    async def newAttempt(self, uow: UnitOfWork) -> UnitOfWork:
        """
        C{uow} under a fresh attempt id from the stream's sequence.
        """
        return evolve(uow, attempt=await self._ids.allocate())


class SharedDelivery:
    """
    What an instance does with a UOW its consumer of a partition delivers:
    settle it through the fanout, announce its report, and say whether to
    acknowledge it.
    """

    log = Logger()

    def __init__(
        self,
        fanout: Fanout,
        front: SharedFront,
        states: SharedStates,
        failQueue: IFailQueue,
        spool: Any,
        verdicts: Verdicts,
        clock: IReactorTime,
    ) -> None:
        self._fanout = fanout
        self._front = front
        self._states = states
        self._failQueue = failQueue
        self._spool = spool
        self._verdicts = verdicts
        self._clock = clock

    def __call__(self, uow: UnitOfWork, delivered: int, replyTo: str | None) -> Deferred[float | None]:
        return Deferred.fromCoroutine(self._handle(uow, delivered, replyTo))

    async def _handle(self, uow: UnitOfWork, delivered: int, replyTo: str | None) -> float | None:
        try:
            failed = self._failQueue.get(uow.id)
            if failed is None and delivered > 1:
                failed = await self._failQueue.fresh(uow.id)
            if failed is not None:
                return None  # an earlier delivery failed it: the fail queue has it
            # Final already: its instance died between recording that and
            # acknowledging, or the consumer's place was lost with every
            # replica at once.
            record = await self._states.get(uow.id)
            if record is not None:
                await self._states.completed(record)
                await self._spool.delete(uow.id)
                if record.report is not None:
                    self._announce(uow.id, record.report, replyTo)
                return None
            if delivered > 1:
                # Another instance (or this one, before a restart) had it.
                uow = await self._front.newAttempt(uow)
            report = await self._fanout.submit(uow)
        except Exception as e:
            # Delivered again, by the stream, not re-driven here.
            self._fanout.unsettled.pop(uow.id, None)
            self.log.error(
                "UOW {uow} could not be settled ({error}); it is delivered again",
                uow=uow.id,
                error=str(e) or type(e).__name__,
            )
            return self._failQueue.retry.delayAfter(1)
        unsettled = self._fanout.unsettled.pop(uow.id, None)
        if unsettled is not None:
            # Delivered again, to this instance or another, after the delay.
            return max(0.0, unsettled.dueAt - self._clock.seconds()) if unsettled.dueAt else 1.0
        if uow.id in self._spool.undeleted:
            # Final, but still in the stream: delivered again, it is found
            # final and deleted then.
            return 1.0
        self._announce(uow.id, report.asRecord(), replyTo)
        return None

    def _announce(self, uowId: int, report: dict[str, Any], replyTo: str | None) -> None:
        if replyTo is not None:
            self._verdicts.announce(uowId, json.dumps(report).encode("utf-8"), replyTo)


class SharedIdempotency(IdempotencyIndex):
    """
    C{Idempotency-Key}s of every instance: a key taken anywhere in the
    cluster is found in the idempotency bucket.
    """

    async def claim(self, key: str, payloadHash: str) -> Replay | None:
        held = self._held.get(key)
        if held is not None:
            return await super().claim(key, payloadHash)
        self._held[key] = (payloadHash, None)
        try:
            holder = await cast(SharedStates, self._states).holderOf(key)
            if holder is None:
                return None
            self.abandon(key)
            heldHash, uowId = holder
            if heldHash != payloadHash:
                raise KeyConflict(422, "this Idempotency-Key was used for a different request")
            record = await self._states.get(uowId)
        except KeyConflict:
            raise
        except Exception as e:
            self.abandon(key)
            raise SpoolUnavailable(f"JetStream did not answer for the Idempotency-Key: {str(e) or type(e).__name__}")
        if record is not None:
            return _replayOf(record, payloadHash)
        entry = self._failQueue.get(uowId)
        if entry is not None:
            return Replay(entry.report, f"/_uow/{entry.uow}")
        raise KeyConflict(409, "the first request with this Idempotency-Key is still in flight")


def clusterStatus(link: JetStreamLink, consumers: PartitionConsumers | None) -> dict[str, Any]:
    """
    The link to the cluster and this instance's part in it.
    """
    return {
        "connected": link.connected,
        "stream": link.settings.stream,
        "partitions": link.settings.partitions,
        "partitions_consumed": len(consumers.consuming) if consumers is not None else 0,
        "redeliveries": consumers.redeliveries if consumers is not None else 0,
    }
