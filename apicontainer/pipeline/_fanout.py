"""
The fanout: sends each UOW to its stashes and settles the outcome.
"""

from __future__ import annotations

from typing import Any, Coroutine, Mapping, Sequence

from attrs import evolve
from twisted.internet.defer import CancelledError, Deferred
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
from ._stashcalls import StashCalls, toRollBack
from ._worker import Routing, StashWorker


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
        turns: IReactorTime | None = None,
    ) -> None:
        """
        @param turns: The reactor, to wait for the end of its turn after a
            UOW reaches the head of the front queue, and take it together
            with the UOWs that reached it in the same turn (from one batch
            of spool writes): one batch for the stashes. Without it, each
            UOW is taken as it comes.
        """
        self._front = front
        self._turns = turns
        self.routing = Routing(workers, routes)
        self._spool = spool
        self._failQueue = failQueue
        self._states = states
        self._journal = journal
        self._idempotency = idempotency
        self._records = records
        self._clock = clock
        self._metrics = metrics
        self._calls = StashCalls(clock, metrics)
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
        queue = self._front.queue
        while True:
            try:
                admission = await queue.get()
            except CancelledError:
                return
            stopped = False
            if self._turns is not None:
                try:
                    await deferLater(self._turns, 0, lambda: None)
                except CancelledError:
                    stopped = True
            # Whatever else has reached the head of the queue goes with it.
            admissions = [admission, *queue.pending]
            queue.pending.clear()
            self._admit(admissions)
            if stopped:
                return

    def _admit(self, admissions: Sequence[Admission]) -> None:
        """
        Settle C{admissions} (in UOW id order): those on a key with no UOW
        under way together, as one batch; each of the others after the UOWs
        before it on its key.
        """
        routing = self.routing
        batch: list[UnitOfWork] = []
        outcomes: list[Deferred[Report]] = []
        for admission in admissions:
            uow = admission.uow
            if uow.key in self._tails or uow.route not in routing.routes:
                self.submit(uow).chainDeferred(admission.done)
                continue
            self._records.begin(uow)
            settled: Deferred[Report] = Deferred()
            self._track(uow, settled).chainDeferred(admission.done)
            batch.append(uow)
            outcomes.append(settled)
        if batch:
            Deferred.fromCoroutine(self._settleBatch(batch, outcomes, routing))

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
        return self._track(uow, settled)

    def _track(self, uow: UnitOfWork, settled: Deferred[Report]) -> Deferred[Report]:
        """
        Count C{settled}, the settling of C{uow}, as under way, and make it
        the tail of C{uow}'s key: the next UOW on the key waits for it.
        """
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
        return await self._guarded(uow, entry, self.settle(uow, entry, routing))

    async def _guarded(self, uow: UnitOfWork, entry: FailedUOW | None, settling: Coroutine[Any, Any, Report]) -> Report:
        """
        The report of C{settling}, the settling of C{uow}; if it fails, keep
        C{uow} for a re-drive (L{unsettle}).
        """
        try:
            report = await settling
        except Exception as e:
            self.log.failure("UOW {uow} could not be settled", uow=uow.id)
            self.unsettle(uow, entry, str(e) or type(e).__name__)
            raise
        redriven = self.unsettled.get(uow.id)
        if redriven is not None and redriven.dueAt is None:
            # A re-drive that settled (one that could not is due again).
            del self.unsettled[uow.id]
        return report

    async def _settleBatch(self, uows: list[UnitOfWork], outcomes: list[Deferred[Report]], routing: Routing) -> None:
        """
        Settle C{uows}, first attempts on keys of their own whose routes are
        configured, together: one delivery and one commit on each stash for
        the batch (each UOW that every stash stored is committed). Then each
        ends on its own: its final state, or its rollbacks. C{outcomes} fire
        with their reports.
        """
        for uow in uows:
            self._records.applying(uow)
        try:
            reports = await self._calls.deliver(uows, routing)
            stored = [(uow, report) for uow, report in zip(uows, reports) if report.outcome is Status.stored]
            uncommitted = await self._calls.commitBatch([uow for uow, _ in stored], routing)
            done = [(u, r) for u, r in stored if u.id not in uncommitted and self._failQueue.get(u.id) is None]
            recorded = await self._recordBatch(done)
        except Exception:
            # A fault of the pipeline's own: each UOW is settled alone, from
            # the start (a stash's stash and commit are idempotent).
            self.log.failure("a batch of UOWs could not be settled together")
            for uow, outcome in zip(uows, outcomes):
                Deferred.fromCoroutine(self._guarded(uow, None, self.settle(uow, None, routing))).chainDeferred(outcome)
            return
        for uow, report, outcome in zip(uows, reports, outcomes):
            if uow.id in recorded:
                concluding = self._stored(uow, report, recorded[uow.id])
            else:
                names = routing.routes[uow.route]
                concluding = self._conclude(uow, names, report, None, routing, uncommitted.get(uow.id, []))
            Deferred.fromCoroutine(self._guarded(uow, None, concluding)).chainDeferred(outcome)

    async def _recordBatch(self, done: list[tuple[UnitOfWork, Report]]) -> dict[int, Exception | Failure | None]:
        """
        Record C{done}, UOWs committed everywhere, as stored, and remove
        their spool files: one batch for the journal (L{_finish} for many).

        @return: The journal's outcome for each UOW, by id.
        """
        if not done:
            return {}
        now = self._clock.seconds()
        records = [StateRecord.of(Status.stored, report, uow.route, now, uow) for uow, report in done]
        outcomes = await self._journal.settleBatch(records)
        return {uow.id: outcome for (uow, _), outcome in zip(done, outcomes)}

    async def _stored(self, uow: UnitOfWork, report: Report, outcome: Exception | Failure | None) -> Report:
        """
        End C{uow}, recorded as stored by L{_recordBatch} with C{outcome}.
        """
        if isinstance(outcome, Failure):
            outcome.raiseException()
        self._idempotency.release(uow)
        self._finished(uow, Status.stored, report, outcome)
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
            (report,) = await self._calls.deliver([uow], routing)
        return await self._conclude(uow, names, report, entry, routing)

    async def _conclude(
        self,
        uow: UnitOfWork,
        names: Sequence[str],
        report: Report,
        entry: FailedUOW | None,
        routing: Routing,
        uncommitted: Sequence[str] | None = None,
    ) -> Report:
        """
        End C{uow}, whose stashes gave C{report}: commit everywhere and
        record it as stored, or roll back and record it as rejected or put
        it on the fail queue.

        @param uncommitted: For a UOW whose commit was tried already (with
            its batch): the stashes where it failed.
        """
        if report.outcome is Status.stored:
            await self._calls.commit(uow, names, routing, uncommitted)
            await self._finish(uow, Status.stored, report)
            return report
        unfinished = await self._calls.everywhere("rollback", uow, toRollBack(uow, report, names, entry), routing)
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

    async def _supersede(
        self, uow: UnitOfWork, names: Sequence[str], newest: int, routing: Routing
    ) -> Report:
        """
        Roll back whatever earlier attempts of C{uow} left, and end it: UOW
        C{newest} on its key was stored after it.
        """
        declined = Verdict.declined(f"superseded by UOW {newest}")
        report = Report.fromVerdicts(uow, {name: declined for name in names})
        unfinished = await self._calls.everywhere("rollback", uow, list(reversed(names)), routing)
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
        self._finished(uow, state, report, removal)

    def _finished(self, uow: UnitOfWork, state: Status, report: Report, removal: Exception | None) -> None:
        """
        The end of L{_finish}, once the final state is durable (and the
        C{Idempotency-Key} released) and the spool file removed, or its
        removal failed with C{removal}.
        """
        if removal is not None:
            # Settled all the same; recovery finds the final state and cleans up.
            self.log.failure("spool file of UOW {uow} could not be deleted", Failure(removal), uow=uow.id)
        self._logReport(uow, report, state.value)
        self._records.finish(uow, state, report)

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

