"""
Stash workers: each reads one stash's routing queue and calls the stash.
"""

from __future__ import annotations

from typing import Mapping, Sequence

from attrs import evolve, frozen
from twisted.internet import defer, error
from twisted.internet.defer import CancelledError, Deferred, DeferredQueue, maybeDeferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from .._crashpoints import reach
from .._multipart import MultipartError
from ..interfaces import IStash
from ..uow import UnitOfWork, Verdict, VerdictKind
from ._deadlines import Deadlines
from ._metrics import Metrics


@frozen
class Delivery:
    """
    A UOW on a routing queue, with the Deferred that fires with the stash's
    verdict.
    """

    uow: UnitOfWork
    verdict: Deferred[Verdict]


class StashWorker:
    """
    Calls one stash for each delivery on its routing queue, with at most
    C{concurrency} calls under way, each bounded by C{timeout} seconds on
    C{clock}.

    Whatever the stash does, the delivery's Deferred fires with a verdict: an
    exception is a 500 verdict, a timeout a 504.

    @ivar queue: The routing queue, a C{DeferredQueue} of L{Delivery}.
    """

    log = Logger()

    def __init__(
        self,
        stash: IStash,
        clock: IReactorTime,
        concurrency: int = 16,
        timeout: float = 30.0,
        part: str | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        """
        @param part: When set, the stash gets only the C{multipart/form-data}
            part of this name, as the UOW's body and content type; a UOW
            without it is declined for the stash, and a malformed multipart
            body is a 400.
        """
        self.stash = stash
        self.queue: DeferredQueue[Delivery] = DeferredQueue()
        self._clock = clock
        self._concurrency = concurrency
        self.timeout = timeout
        self.part = part
        self._metrics = metrics
        # The timeouts of its calls to the stash (and the fanout's commits
        # and rollbacks on it), all of one length: one timer.
        self.deadlines = Deadlines(clock)
        self._loops: list[Deferred[None]] = []

    @property
    def name(self) -> str:
        return self.stash.name  # type: ignore[no-any-return]

    def start(self) -> None:
        """
        Start reading the routing queue.
        """
        self._loops = [Deferred.fromCoroutine(self._work()) for _ in range(self._concurrency)]

    def stop(self) -> None:
        """
        Stop reading the routing queue; calls under way go on to their end.
        """
        loops, self._loops = self._loops, []
        for loop in loops:
            loop.cancel()

    async def _work(self) -> None:
        while True:
            try:
                delivery = await self.queue.get()
            except CancelledError:
                return
            verdict = await self.call(delivery.uow)
            if verdict.kind is VerdictKind.stored:
                reach(f"stored:{self.name}")
            delivery.verdict.callback(verdict)

    async def call(self, uow: UnitOfWork) -> Verdict:
        """
        Ask the stash for its verdict on C{uow}, within the timeout.
        """
        started = self._clock.seconds()
        verdict = await self._call(uow)
        if self._metrics is not None:
            self._metrics.of(self._metrics.latency, self.name).observe(self._clock.seconds() - started)
            self._metrics.of(self._metrics.verdicts, self.name, verdict.kind.value, verdict.status).inc()
        return verdict

    async def _call(self, uow: UnitOfWork) -> Verdict:
        if self.part is not None and not uow.isDelete:
            try:
                found = uow.part(self.part)
            except MultipartError as e:
                return Verdict.failed(400, str(e))
            if found is None:
                return Verdict.declined(f"no part named {self.part!r}")
            uow = evolve(uow, body=found.body, contentType=found.contentType, _parts={}, _digest=None)
        attempt = self.deadlines.watch(maybeDeferred(self.stash.stash, uow), self.timeout)
        try:
            verdict = await attempt
        except (defer.TimeoutError, error.TimeoutError):
            self.log.warn(
                "stash {stash} timed out on UOW {uow} after {timeout}s",
                stash=self.name,
                uow=uow.id,
                timeout=self.timeout,
            )
            return Verdict.failed(504, f"timed out after {self.timeout:g}s")
        except Exception as e:
            self.log.failure("stash {stash} raised on UOW {uow}", stash=self.name, uow=uow.id)
            return Verdict.failed(500, f"{type(e).__name__}: {e}")
        if not isinstance(verdict, Verdict):
            self.log.error(
                "stash {stash} answered UOW {uow} with {answer!r}, not a Verdict",
                stash=self.name,
                uow=uow.id,
                answer=verdict,
            )
            return Verdict.failed(500, "the stash gave no verdict")
        return verdict


@frozen
class Routing:
    """
    Which stashes a UOW goes to: the configuration in force when the UOW
    reached the fanout. A reload swaps it; UOWs under way keep theirs.

    @ivar routes: Route pattern to its stash names, in configuration order.
    """

    workers: Mapping[str, StashWorker]
    routes: Mapping[str, Sequence[str]]
