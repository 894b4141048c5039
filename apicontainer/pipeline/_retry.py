"""
The retry engine: brings failed UOWs back when their next attempt is due.
"""

from __future__ import annotations

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from ..interfaces import IFailQueue, ISpool
from ..storage import CorruptSpoolFile, FailedUOW
from ..uow import Report, Status
from ._fanout import Fanout
from ._frontqueue import Front
from ._metrics import Metrics
from ._records import Unsettled


class RetryEngine:
    """
    Every C{interval} seconds on C{clock}, takes the fail queue's due entries,
    oldest UOW first, and settles each again under a fresh attempt id through
    the fanout, which keeps them in order with other UOWs on their key.

    A retry that stores ends the UOW as stored; one that gets a 4xx ends it
    as rejected; one that fails again goes back to the queue with a longer
    delay, or parks after C{max_attempts}. A UOW whose rollback failed after a
    4xx is retried by rolling back only, and is stuck after C{max_attempts}.
    """

    log = Logger()

    def __init__(
        self,
        clock: IReactorTime,
        failQueue: IFailQueue,
        fanout: Fanout,
        front: Front,
        spool: ISpool,
        interval: float = 1.0,
        metrics: Metrics | None = None,
    ) -> None:
        self._clock = clock
        self._failQueue = failQueue
        self._fanout = fanout
        self._front = front
        self._spool = spool
        self._interval = interval
        self._metrics = metrics
        self._loop: LoopingCall | None = None

    def start(self) -> None:
        """
        Start looking for due entries, now and then every C{interval}.
        """
        self._loop = LoopingCall(self.tick)
        self._loop.clock = self._clock
        self._loop.start(self._interval, now=True)

    def stop(self) -> None:
        """
        Stop looking; attempts under way go on.
        """
        if self._loop is not None and self._loop.running:
            self._loop.stop()

    def tick(self) -> Deferred[None]:
        """
        Start an attempt for every due entry, and re-drive every unsettled
        UOW whose backoff is over.

        @return: A Deferred that fires once the attempts have started (not
            finished).
        """

        def start(due: list[FailedUOW]) -> None:
            for entry in due:
                self._attempt(entry)

        def failed(reason: Failure) -> None:
            self.log.failure("could not take the due entries of the fail queue", reason)

        started = self._failQueue.takeDue().addCallbacks(start, failed)
        for unsettled in self._fanout.takeUnsettled():
            Deferred.fromCoroutine(self._redrive(unsettled))
        return started

    async def _redrive(self, unsettled: Unsettled) -> None:
        """
        Settle an unsettled UOW again under a fresh attempt id; the fanout
        keeps it again if this attempt cannot be made durable either.
        """
        uow = unsettled.uow
        self.log.warn(
            "re-driving unsettled UOW {uow} on {key} (try {tries})",
            uow=uow.id,
            key=uow.key,
            tries=unsettled.tries + 1,
        )
        try:
            attempt = await self._front.newAttempt(uow)
        except Exception as e:
            self.log.failure("unsettled UOW {uow} could not get a new attempt id", uow=uow.id)
            self._fanout.unsettle(uow, unsettled.entry, f"no new attempt id: {e}")
            return
        try:
            await self._fanout.submit(attempt, unsettled.entry)
        except Exception:
            # Logged, and kept again, by the fanout.
            pass

    async def retryNow(self, uowId: int) -> Deferred[Report | None] | None:
        """
        Start an attempt at C{uowId} now, whatever its schedule or state.

        @return: A Deferred that fires with the attempt's report (L{None} if
            the spool file was unusable), or L{None} when the UOW is not in the
            fail queue or an attempt is already under way.
        """
        entry = await self._failQueue.markRetrying(uowId)
        if entry is None:
            return None
        return self._attempt(entry)

    def _attempt(self, entry: FailedUOW) -> Deferred[Report | None]:
        if self._metrics is not None:
            self._metrics.retries.inc()
        attempt = Deferred.fromCoroutine(self._run(entry))

        def failed(reason):  # type: ignore[no-untyped-def]
            self.log.failure("retry of UOW {uow} failed", reason, uow=entry.uow)
            return None

        return attempt.addErrback(failed)

    async def _run(self, entry: FailedUOW) -> Report | None:
        try:
            uow = await self._spool.load(entry.uow)
        except (CorruptSpoolFile, FileNotFoundError) as e:
            await self._unusable(entry, e)
            return None
        self.log.warn(
            "retrying UOW {uow} on {key} (attempt {attempts} of {limit})",
            uow=entry.uow,
            key=entry.key,
            attempts=entry.attempts + 1,
            limit=self._failQueue.retry.maxAttempts,
        )
        uow = await self._front.newAttempt(uow)
        report = await self._fanout.submit(uow, entry)
        after = self._failQueue.get(entry.uow)
        if after is not None and after.state in (Status.parked, Status.stuck):
            self.log.error(
                "UOW {uow} on {key} is {state} after {attempts} attempts; an operator must"
                " retry or drop it",
                uow=entry.uow,
                key=entry.key,
                state=after.state.value,
                attempts=after.attempts,
            )
        return report

    async def _unusable(self, entry: FailedUOW, error: Exception) -> None:
        if isinstance(error, CorruptSpoolFile):
            await self._spool.quarantine(entry.uow)
        self.log.error(
            "UOW {uow} cannot be retried: its spool file is {problem}; it leaves the fail queue",
            uow=entry.uow,
            problem="corrupt (quarantined)" if isinstance(error, CorruptSpoolFile) else "missing",
        )
        await self._failQueue.drop(entry.uow)
