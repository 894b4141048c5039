"""
Every instance consumes every partition of the stream through one durable
pull consumer per partition with one UOW in flight (C{max_ack_pending: 1}),
so UOWs on a key are applied in stream order, across instances and
failovers. The instance that holds a UOW extends its lease while it works
(in-progress acks) and acknowledges it only once its final state is
recorded; one that dies mid-UOW leaves it to another after C{ack_wait_s}.

Verdicts go back to the instance that took the request over core NATS.
"""

from __future__ import annotations

import asyncio
from typing import Any, Callable

from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger

from ..uow import UnitOfWork
from ._jetstream import REPLY, JetStreamLink, aio
from ._jsspool import uowOf
from ._spoolfile import CorruptSpoolFile

# What the pipeline makes of a delivered UOW (with how many times it was
# delivered, and where its report goes): None to acknowledge it, or a delay
# in seconds after which it is delivered again.
Handler = Callable[[UnitOfWork, int, "str | None"], Deferred[float | None]]


class PartitionConsumers:
    """
    The pull loops of one instance, one per partition.

    @ivar consuming: The partitions whose consumer this instance is bound to.
    @ivar redeliveries: UOWs delivered more than once (another instance died,
        or this one asked for it again).
    """

    log = Logger()

    def __init__(self, link: JetStreamLink, handler: Handler) -> None:
        self.link = link
        self._handler = handler
        self._tasks: dict[int, asyncio.Future[None]] = {}
        self._busy: set[int] = set()
        self._running = False
        self.consuming: set[int] = set()
        self.redeliveries = 0

    def start(self) -> None:
        self._running = True
        for partition in range(self.link.settings.partitions):
            self._tasks[partition] = asyncio.ensure_future(self._run(partition))
        self.link.onReconnected.append(self._pullAgain)

    def _pullAgain(self) -> None:
        """
        After a reconnection, pull again at once: a pull request sent
        through a server that died would otherwise be waited on until it
        expires.
        """
        if not self._running:
            return
        for partition, task in list(self._tasks.items()):
            if partition not in self._busy:
                task.cancel()
                self._tasks[partition] = asyncio.ensure_future(self._run(partition))

    def pause(self) -> None:
        """
        Take no more UOWs (at shutdown); those under way finish, and are
        acknowledged.
        """
        self._running = False
        for partition, task in self._tasks.items():
            if partition not in self._busy:
                task.cancel()

    def stop(self) -> Deferred[None]:
        """
        Stop every loop now. A UOW still under way goes on in the pipeline,
        unacknowledged: the stream gives it to another instance after
        C{ack_wait_s}, which finds it settled, or settles it.
        """
        self._running = False
        tasks, self._tasks = list(self._tasks.values()), {}
        for task in tasks:
            task.cancel()
        return aio(_gather(tasks))

    async def _subscribe(self, partition: int) -> Any:
        from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

        s = self.link.settings
        name = f"p{partition}"
        config = ConsumerConfig(
            durable_name=name,
            filter_subject=s.subject(partition),
            ack_policy=AckPolicy.EXPLICIT,
            deliver_policy=DeliverPolicy.ALL,
            max_ack_pending=1,
            ack_wait=s.ackWait,
            max_deliver=-1,
            # Where the consumer is (its acks), replicated in memory: an ack
            # fsynced on every replica cost four times the rest of a UOW.
            # Should every replica restart at once, the consumer starts from
            # the stream's first message again, and the pipeline skips what
            # is final or in the fail queue (it checks every delivery).
            mem_storage=True,
        )
        return await self.link.js.pull_subscribe(s.subject(partition), durable=name, stream=s.stream, config=config)

    async def _run(self, partition: int) -> None:
        subscription = None
        while self._running:
            try:
                if subscription is None:
                    subscription = await self._subscribe(partition)
                    self.consuming.add(partition)
                try:
                    messages = await subscription.fetch(1, timeout=5)
                except asyncio.TimeoutError:
                    continue
                for message in messages:
                    self._busy.add(partition)
                    try:
                        await self._deliver(message)
                    finally:
                        self._busy.discard(partition)
            except asyncio.CancelledError:
                break
            except Exception as e:
                self.consuming.discard(partition)
                self.log.debug("partition {p}: {error}", p=partition, error=str(e) or type(e).__name__)
                if subscription is not None:
                    try:
                        await subscription.unsubscribe()
                    except Exception:
                        pass
                subscription = None
                await asyncio.sleep(1.0)
        self.consuming.discard(partition)

    async def _deliver(self, message: Any) -> None:
        uowId = message.metadata.sequence.stream
        delivered = message.metadata.num_delivered
        if delivered > 1:
            self.redeliveries += 1
        try:
            uow = uowOf(message.data, uowId)
        except CorruptSpoolFile:
            self.log.error("UOW {uow}'s message is not a UOW: terminated", uow=uowId)
            await message.term()
            return
        beating = asyncio.ensure_future(self._keepLease(message))
        # Stopping this loop must not cut the UOW's settlement short.
        shield: Deferred[float | None] = Deferred()
        replyTo = (message.headers or {}).get(REPLY)
        self._handler(uow, delivered, replyTo).chainDeferred(shield)
        try:
            again = await Deferred.asFuture(shield, asyncio.get_event_loop())
        finally:
            beating.cancel()
        if again is None:
            # Not waiting for the server's word saves the partition a round
            # trip; an ack that is lost only means a redelivery, which finds
            # the UOW final and cleans up.
            await message.ack()
        else:
            await message.nak(delay=again)

    async def _keepLease(self, message: Any) -> None:
        every = max(0.5, self.link.settings.ackWait / 3)
        while True:
            await asyncio.sleep(every)
            try:
                await message.in_progress()
            except Exception:
                pass


async def _gather(tasks: list[asyncio.Future[None]]) -> None:
    await asyncio.gather(*tasks, return_exceptions=True)


class Verdicts:
    """
    Reports of settled UOWs, published by the instance that settled them to
    the instance that took the request (its inbox, named in the UOW's
    message), whose client waits.
    """

    def __init__(self, link: JetStreamLink, remember: int = 4096) -> None:
        self.link = link
        self._waiting: dict[int, list[Deferred[bytes]]] = {}
        self._early: dict[int, bytes] = {}
        self._remember = remember
        self._subscription: Any = None
        link.onConnected.append(self._subscribe)

    async def _subscribe(self) -> None:
        async def heard(message: Any) -> None:
            uowId = int(message.headers["uow"])
            waiting = self._waiting.pop(uowId, None)
            if waiting is None:
                # Before this instance saw its publish acknowledged.
                self._early[uowId] = message.data
                while len(self._early) > self._remember:
                    del self._early[next(iter(self._early))]
                return
            for d in waiting:
                d.callback(message.data)

        self._subscription = await self.link.nc.subscribe(self.link.inbox, cb=heard)

    def announce(self, uowId: int, report: bytes, to: str) -> Deferred[None]:
        """
        Tell the instance whose inbox is C{to} that UOW C{uowId} settled
        with C{report}.
        """
        return aio(self._announce(uowId, report, to))

    async def _announce(self, uowId: int, report: bytes, to: str) -> None:
        try:
            await self.link.nc.publish(to, report, headers={"uow": str(uowId)})
        except Exception:
            pass  # its client times out, and finds it under /_uow

    def wait(self, uowId: int) -> Deferred[bytes]:
        """
        The report of UOW C{uowId}, when it is heard; cancel to stop
        waiting.
        """
        early = self._early.pop(uowId, None)
        if early is not None:
            return succeed(early)

        def cancelled(d: Deferred[bytes]) -> None:
            waiting = self._waiting.get(uowId, [])
            if d in waiting:
                waiting.remove(d)
            if not waiting:
                self._waiting.pop(uowId, None)

        d: Deferred[bytes] = Deferred(cancelled)
        self._waiting.setdefault(uowId, []).append(d)
        return d
