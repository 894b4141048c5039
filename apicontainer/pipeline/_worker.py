"""
Stash workers: each reads one stash's routing queue and calls the stash.
"""

from __future__ import annotations

from typing import Mapping, Sequence, cast

from attrs import evolve, frozen
from twisted.internet import defer, error
from twisted.internet.defer import (
    CancelledError,
    Deferred,
    DeferredList,
    DeferredQueue,
    DeferredSemaphore,
    maybeDeferred,
)
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from .._crashpoints import reach
from .._multipart import MultipartError
from ..interfaces import IBatchStash, IStash
from ..uow import UnitOfWork, Verdict, VerdictKind
from ._deadlines import Deadlines
from ._metrics import Metrics


@frozen
class Delivery:
    """
    A batch of UOWs on a routing queue (no two on one key, in UOW id order),
    with the Deferred that fires with the stash's verdicts, one per UOW.
    """

    uows: Sequence[UnitOfWork]
    verdicts: Deferred[list[Verdict]]


class StashWorker:
    """
    Calls one stash for each delivery on its routing queue, with at most
    C{concurrency} calls under way, each bounded by C{timeout} seconds on
    C{clock}: a stash that provides L{IBatchStash} once for the whole batch,
    any other once for each of its UOWs.

    Whatever the stash does, the delivery's Deferred fires with a verdict
    for each UOW: an exception is a 500 verdict, a timeout a 504.

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
        # The stash, if it takes a batch in one call.
        self.batched: IBatchStash | None = cast(IBatchStash, stash) if IBatchStash.providedBy(stash) else None
        self.queue: DeferredQueue[Delivery] = DeferredQueue()
        self._clock = clock
        self._concurrency = concurrency
        # A stash called once per UOW: at most this many calls at once, over
        # all batches.
        self._limit = DeferredSemaphore(concurrency)
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
            verdicts = await self.callBatch(delivery.uows)
            for verdict in verdicts:
                if verdict.kind is VerdictKind.stored:
                    reach(f"stored:{self.name}")
            delivery.verdicts.callback(verdicts)

    async def call(self, uow: UnitOfWork) -> Verdict:
        """
        Ask the stash for its verdict on C{uow}, within the timeout.
        """
        (verdict,) = await self.callBatch([uow])
        return verdict

    async def callBatch(self, uows: Sequence[UnitOfWork]) -> list[Verdict]:
        """
        Ask the stash for its verdict on each of C{uows}, within the
        timeout.
        """
        verdicts: list[Verdict | None] = []
        asked: list[UnitOfWork] = []
        for uow in uows:
            verdict, uow = self._part(uow)
            verdicts.append(verdict)
            if verdict is None:
                asked.append(uow)
        answers: list[tuple[Verdict, float]] = []
        if asked and self.batched is not None:
            started = self._clock.seconds()
            batch = await self._callBatch(asked)
            answers = [(verdict, self._clock.seconds() - started) for verdict in batch]
        elif asked:
            calls = [self._limit.run(lambda uow: Deferred.fromCoroutine(self._timed(uow)), uow) for uow in asked]
            answers = [answer for _, answer in await DeferredList(calls)]
        given = iter(answers)
        final = [(verdict, 0.0) if verdict is not None else next(given) for verdict in verdicts]
        if self._metrics is not None:
            for verdict, seconds in final:
                self._metrics.of(self._metrics.latency, self.name).observe(seconds)
                self._metrics.of(self._metrics.verdicts, self.name, verdict.kind.value, verdict.status).inc()
        return [verdict for verdict, _ in final]

    async def _timed(self, uow: UnitOfWork) -> tuple[Verdict, float]:
        started = self._clock.seconds()
        verdict = await self._call(uow)
        return verdict, self._clock.seconds() - started

    def _part(self, uow: UnitOfWork) -> tuple[Verdict | None, UnitOfWork]:
        """
        The verdict on C{uow} without asking the stash, if it has one: a
        UOW without the stash's C{part} is declined, one whose multipart
        body is malformed is a 400. Otherwise the UOW to send, with only
        that part as its body.
        """
        if self.part is None or uow.isDelete:
            return None, uow
        try:
            found = uow.part(self.part)
        except MultipartError as e:
            return Verdict.failed(400, str(e)), uow
        if found is None:
            return Verdict.declined(f"no part named {self.part!r}"), uow
        return None, evolve(uow, body=found.body, contentType=found.contentType, _parts={}, _digest=None)

    async def _callBatch(self, uows: Sequence[UnitOfWork]) -> list[Verdict]:
        assert self.batched is not None
        attempt = self.deadlines.watch(maybeDeferred(self.batched.stashBatch, uows), self.timeout)
        ids = ", ".join(str(uow.id) for uow in uows)
        try:
            verdicts = await attempt
        except (defer.TimeoutError, error.TimeoutError):
            self.log.warn(
                "stash {stash} timed out on UOWs {uows} after {timeout}s",
                stash=self.name,
                uows=ids,
                timeout=self.timeout,
            )
            return [Verdict.failed(504, f"timed out after {self.timeout:g}s")] * len(uows)
        except Exception as e:
            self.log.failure("stash {stash} raised on UOWs {uows}", stash=self.name, uows=ids)
            return [Verdict.failed(500, f"{type(e).__name__}: {e}")] * len(uows)
        if len(verdicts) != len(uows) or not all(isinstance(verdict, Verdict) for verdict in verdicts):
            self.log.error(
                "stash {stash} answered UOWs {uows} with {answer!r}, not a Verdict each",
                stash=self.name,
                uows=ids,
                answer=verdicts,
            )
            return [Verdict.failed(500, "the stash gave no verdict")] * len(uows)
        return list(verdicts)

    async def _call(self, uow: UnitOfWork) -> Verdict:
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
