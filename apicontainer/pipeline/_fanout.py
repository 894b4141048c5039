"""
The fanout: sends each UOW to its stashes and settles the outcome.
"""

from __future__ import annotations

from typing import Mapping, Sequence

from attrs import evolve
from twisted.internet.defer import CancelledError, Deferred, DeferredList, maybeDeferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure

from .._crashpoints import reach
from ..interfaces import IFailQueue, IJournal, ISpool
from ..storage import FailedUOW, StateRecord, StateStore
from ..uow import Report, Status, UnitOfWork, Verdict
from ._frontqueue import Admission, Front
from ._idempotency import IdempotencyIndex
from ._metrics import Metrics
from ._records import Unsettled, UOWRecords
from ._worker import Delivery, Routing, StashWorker

# Seconds to wait before each new try of a failed commit.
COMMIT_RETRIES = (0.1, 1.0)


class CommitFailed(Exception):
    """
    A stash could not commit a UOW that every stash had stored.
    """


class Fanout:
    """
    Takes UOWs from the head of the front queue, and retried or recovered
    UOWs from the retry engine and recovery, and settles each one.

    For a UOW, the fanout puts a delivery on the routing queue of every stash
    of its route, gathers the verdicts, then:

      - all 2xx: commits everywhere, records the UOW as stored and deletes
        its spool file;
      - otherwise: rolls back everywhere, in reverse configuration order, and
        either records it as rejected and deletes the spool file (a 4xx:
        retrying cannot help), or records it in the fail queue (a 5xx),
        keeping the spool file.

    A later attempt of a UOW whose key already holds a newer stored UOW is
    rolled back instead (superseded), so it can never overwrite the newer one.

    UOWs on the same key are settled one at a time, in the order they reach
    the fanout (UOW order, from the front queue): the next one starts only
    when the previous one, rollback included, is done.

    @param routes: Route pattern to its stash names, in configuration order.
    """

    log = Logger()

    def __init__(
        self,
        front: Front,
        workers: Mapping[str, StashWorker],
        routes: Mapping[str, Sequence[str]],
        spool: ISpool,
        failQueue: IFailQueue,
        states: StateStore,
        journal: IJournal,
        idempotency: IdempotencyIndex,
        records: UOWRecords,
        clock: IReactorTime,
        metrics: Metrics | None = None,
    ) -> None:
        self._front = front
        self.routing = Routing(workers, routes)
        self._spool = spool
        self._failQueue = failQueue
        self._states = states
        self._journal = journal
        self._idempotency = idempotency
        self._records = records
        self._clock = clock
        self._metrics = metrics
        self._tails: dict[str, Deferred[None]] = {}
        self._loop: Deferred[None] | None = None
        self.active: set[Deferred[Report]] = set()
        self.unsettled: dict[int, Unsettled] = {}

    def start(self) -> None:
        """
        Start taking UOWs from the front queue.
        """
        self._loop = Deferred.fromCoroutine(self._run())

    def stop(self) -> None:
        """
        Stop taking UOWs from the front queue; those under way go on.
        """
        if self._loop is not None:
            self._loop.cancel()
            self._loop = None

    async def _run(self) -> None:
        while True:
            try:
                admission = await self._front.queue.get()
            except CancelledError:
                return
            self._admit(admission)

    def _admit(self, admission: Admission) -> None:
        self.submit(admission.uow).chainDeferred(admission.done)

    def submit(self, uow: UnitOfWork, entry: FailedUOW | None = None) -> Deferred[Report]:
        """
        Settle C{uow} after every UOW submitted before it on its key.

        @param entry: The fail queue entry, when this is a retry of one.
        @return: A Deferred that fires with the report; it fails only on a
            fault of the pipeline itself, in which case the spool file stays
            for recovery.
        """
        self._records.begin(uow)
        previous = self._tails.get(uow.key)
        settled = Deferred.fromCoroutine(self._settleAfter(previous, uow, entry, self.routing))
        tail: Deferred[None] = Deferred()
        self._tails[uow.key] = tail
        self.active.add(settled)

        def done(result: object) -> object:
            self.active.discard(settled)
            if self._tails.get(uow.key) is tail:
                del self._tails[uow.key]
            tail.callback(None)
            return result

        settled.addBoth(done)
        return settled

    async def _settleAfter(
        self,
        previous: Deferred[None] | None,
        uow: UnitOfWork,
        entry: FailedUOW | None,
        routing: Routing,
    ) -> Report:
        if previous is not None:
            await previous
        try:
            report = await self.settle(uow, entry, routing)
        except Exception as e:
            self.log.failure("UOW {uow} could not be settled", uow=uow.id)
            self.unsettle(uow, entry, str(e) or type(e).__name__)
            raise
        redriven = self.unsettled.get(uow.id)
        if redriven is not None and redriven.dueAt is None:
            # A re-drive that settled (one that could not is due again).
            del self.unsettled[uow.id]
        return report

    def unsettle(self, uow: UnitOfWork, entry: FailedUOW | None, reason: str) -> None:
        """
        Keep C{uow}, whose attempt could not be made durable, for a re-drive
        after a backoff on the fail queue's retry policy (see L{takeUnsettled}).
        """
        previous = self.unsettled.get(uow.id)
        tries = previous.tries + 1 if previous is not None else 1
        delay = self._failQueue.retry.delayAfter(tries)
        self.unsettled[uow.id] = Unsettled(uow, entry, tries, self._clock.seconds() + delay, reason)
        self._records.finish(uow, Status.unsettled, None)
        self.log.error(
            "UOW {uow} on {key} is unsettled ({reason}); its spool file stays and it is"
            " re-driven in {delay:.0f}s",
            uow=uow.id,
            key=uow.key,
            reason=reason,
            delay=delay,
        )

    def takeUnsettled(self) -> list[Unsettled]:
        """
        Take the unsettled UOWs whose re-drive is due, oldest first, and
        mark them as under way. The caller re-drives each: it leaves this set
        once it settles, or is scheduled again by L{unsettle}.
        """
        now = self._clock.seconds()
        due = []
        for uowId, unsettled in sorted(self.unsettled.items()):
            if unsettled.dueAt is not None and unsettled.dueAt <= now:
                due.append(unsettled)
                self.unsettled[uowId] = evolve(unsettled, dueAt=None)
        return due

    async def settle(
        self, uow: UnitOfWork, entry: FailedUOW | None = None, routing: Routing | None = None
    ) -> Report:
        """
        Deliver C{uow} to every stash of its route and settle the outcome.

        @param entry: The fail queue entry, when this is a retry of one. A
            retry of a rejected UOW whose rollback failed only rolls back.
        @param routing: The stashes to use; the current ones by default.
        @return: The report of this attempt.
        """
        routing = routing or self.routing
        self._records.applying(uow)
        if uow.route not in routing.routes:
            # A reload removed the route of a UOW retried or recovered since.
            missing = Verdict.failed(503, f"route {uow.route} is no longer configured")
            report = Report.fromVerdicts(uow, {"(route)": missing})
            queued = self._failQueue.failed(report, uow.route)
            await self._failQueue.put(queued)
            self._logReport(uow, report, queued.state.value)
            self._records.finish(uow, Status.queued, report)
            return report
        names = routing.routes[uow.route]
        if uow.isRetry:
            newest = await self._states.lastStored(uow.key)
            if newest is not None and newest > uow.id:
                return await self._supersede(uow, names, newest, routing)
        if entry is not None and entry.compensate:
            report = entry.report
        else:
            report = await self._deliver(uow, names, routing)
        if report.outcome is Status.stored:
            await self._commit(uow, names, routing)
            await self._finish(uow, Status.stored, report)
            return report
        unfinished = await self._everywhere("rollback", uow, _toRollBack(uow, report, names, entry), routing)
        if unfinished or report.outcome is Status.queued:
            compensate = report.outcome is Status.rejected
            queued = self._failQueue.failed(report, uow.route, tuple(unfinished), compensate)
            try:
                await self._failQueue.put(queued)
            except Exception as e:
                self.log.failure("UOW {uow} could not be recorded in the fail queue", uow=uow.id)
                self._logReport(uow, report, Status.unsettled.value)
                self.unsettle(uow, entry, f"the fail queue could not be written: {e}")
                return report
            reach("after-failqueue-write")
            self._logReport(uow, report, queued.state.value)
            self._records.finish(uow, Status.queued, report)
            return report
        await self._finish(uow, Status.rejected, report)
        return report

    async def _deliver(self, uow: UnitOfWork, names: Sequence[str], routing: Routing) -> Report:
        pending = []
        for name in names:
            delivery = Delivery(uow, Deferred())
            routing.workers[name].queue.put(delivery)
            pending.append(delivery.verdict)
        results = await DeferredList(pending, consumeErrors=True)
        verdicts: dict[str, Verdict] = {}
        for name, (ok, value) in zip(names, results):
            # A worker turns every error into a verdict; a failure here is a bug.
            verdicts[name] = value if ok else Verdict.failed(500, str(value.value))  # type: ignore[attr-defined]
        return Report.fromVerdicts(uow, verdicts)

    async def _supersede(
        self, uow: UnitOfWork, names: Sequence[str], newest: int, routing: Routing
    ) -> Report:
        """
        Roll back whatever earlier attempts of C{uow} left, and end it: UOW
        C{newest} on its key was stored after it.
        """
        declined = Verdict.declined(f"superseded by UOW {newest}")
        report = Report.fromVerdicts(uow, {name: declined for name in names})
        unfinished = await self._everywhere("rollback", uow, list(reversed(names)), routing)
        if unfinished:
            queued = self._failQueue.failed(report, uow.route, tuple(unfinished), compensate=True)
            await self._failQueue.put(queued)
            self._records.finish(uow, Status.queued, report)
            return report
        await self._finish(uow, Status.superseded, report)
        return report

    async def _finish(self, uow: UnitOfWork, state: Status, report: Report) -> None:
        """
        Record the final state durably, then forget the fail queue entry and
        the spool file. A crash in between leaves them for recovery, which
        sees the final state and only cleans up.
        """
        record = StateRecord.of(state, report, uow.route, self._clock.seconds(), uow)
        entry = self._failQueue.get(uow.id)
        # Without a fail queue entry to drop first (the common case), the
        # spool file goes in the journal's batch, right after the record.
        removal = await self._journal.settle(record, removeSpool=entry is None)
        self._idempotency.release(uow)
        if entry is not None:
            await self._failQueue.drop(uow.id)
            reach("before-spool-delete")
            try:
                await self._spool.delete(uow.id)
            except Exception as e:
                removal = e
        if removal is not None:
            # Settled all the same; recovery finds the final state and cleans up.
            self.log.failure("spool file of UOW {uow} could not be deleted", Failure(removal), uow=uow.id)
        self._logReport(uow, report, state.value)
        self._records.finish(uow, state, report)

    async def _commit(self, uow: UnitOfWork, names: Sequence[str], routing: Routing) -> None:
        """
        Commit C{uow} everywhere. A stash whose commit fails is asked again
        after each of L{COMMIT_RETRIES} seconds (a commit is idempotent; a
        filesystem stash whose process ended commits through a new one).

        @raise CommitFailed: A commit still failed: the UOW is not settled,
            and its spool file stays for recovery (its write may not be
            durable, so it gets no 200).
        """
        failed = await self._everywhere("commit", uow, names, routing)
        for delay in COMMIT_RETRIES:
            if not failed:
                return
            await deferLater(self._clock, delay, lambda: None)
            failed = await self._everywhere("commit", uow, failed, routing)
        if failed:
            raise CommitFailed(f"UOW {uow.id} could not be committed in {', '.join(failed)}")

    async def _everywhere(
        self, step: str, uow: UnitOfWork, names: Sequence[str], routing: Routing
    ) -> list[str]:
        """
        Run C{commit} or C{rollback} on each named stash, each within the
        stash's C{timeout_s}: commits all at once (each is independent, and a
        crash between them leaves the rest to recovery), rollbacks one after
        another in the order given.

        @return: The names of the stashes where it failed.
        """
        if step == "commit":
            calls = [self._onStash(step, uow, name, routing) for name in names]
            if len(calls) > 1:

                def firstCommitted(ok: bool) -> bool:
                    reach("during-commit")
                    return ok

                calls[0].addCallback(firstCommitted)
            done = await DeferredList(calls)
            return [name for name, (_, ok) in zip(names, done) if not ok]
        failed = []
        for index, name in enumerate(names):
            ok = await self._onStash(step, uow, name, routing)
            if index == 0:
                reach(f"during-{step}")
            if self._metrics is not None:
                self._metrics.of(self._metrics.rollbacks, name, "ok" if ok else "failed").inc()
            if not ok:
                failed.append(name)
        return failed

    def _onStash(self, step: str, uow: UnitOfWork, name: str, routing: Routing) -> Deferred[bool]:
        """
        Run C{step} on stash C{name} within its C{timeout_s}.

        @return: A Deferred that fires with whether it succeeded (a failure
            is logged).
        """
        worker = routing.workers[name]

        def failed(reason: Failure) -> bool:
            self.log.failure(
                "stash {stash} failed to {step} UOW {uow}",
                reason,
                stash=name,
                step=step,
                uow=uow.id,
            )
            return False

        call = worker.deadlines.watch(maybeDeferred(getattr(worker.stash, step), uow), worker.timeout)
        return call.addCallbacks(lambda _: True, failed)

    def _logReport(self, uow: UnitOfWork, report: Report, state: str) -> None:
        if self._metrics is not None:
            self._metrics.of(self._metrics.uows, uow.route, state).inc()
        if state in ("stored", "superseded"):
            # The access log already has a line for each request: a first
            # attempt that ends well gets its own at debug level (twist
            # --log-level debug), which saves the reactor a JSON log event
            # per request. A retry or a re-drive that ends well is news.
            emit = self.log.info if uow.isRetry else self.log.debug
        elif state in ("parked", "stuck"):
            emit = self.log.error
        else:
            emit = self.log.warn
        emit(
            "UOW {uow} {method} {key}: {state} ({status})",
            uow=uow.id,
            method=uow.method,
            key=uow.key,
            route=uow.route,
            attempt=uow.attempt,
            state=state,
            status=report.status,
            report=report.asRecord(),
        )


def _toRollBack(uow: UnitOfWork, report: Report, names: Sequence[str], entry: FailedUOW | None) -> list[str]:
    """
    The stashes to roll back after a failed attempt, last configured first.

    On a UOW's first attempt, every one but those that refused it (a 4xx:
    they stored nothing). On a later attempt, every one: a refusal says this
    attempt stored nothing, but an earlier one may have stored there and
    not been rolled back, if a crash cut it short (its fail queue entry
    cannot say so) or its rollback failed.
    """
    if uow.isRetry:
        return list(reversed(names))
    return [name for name in reversed(names) if name not in report.verdicts or not report.verdicts[name].refused]
