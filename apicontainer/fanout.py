"""
The fanout: sends each UOW to its stashes and settles the outcome.
"""

from __future__ import annotations

from typing import Mapping, Sequence

from twisted.internet.defer import CancelledError, Deferred, DeferredList
from twisted.logger import Logger

from .failqueue import FileFailQueue
from .frontqueue import Admission, FrontQueue
from .records import UOWRecords, UOWState
from .spool import Spool
from .uow import Outcome, Report, UnitOfWork, Verdict
from .worker import Delivery, StashWorker


class Fanout:
    """
    Takes UOWs from the head of the front queue and settles each one.

    For a UOW, the fanout puts a delivery on the routing queue of every stash
    of its route, gathers the verdicts, then:

      - all 2xx: commits everywhere and deletes the spool file;
      - otherwise: rolls back everywhere, in reverse configuration order, and
        either deletes the spool file (a 4xx: retrying cannot help) or records
        the UOW in the fail queue (a 5xx), keeping the spool file.

    UOWs on the same key are settled one at a time, in UOW order: the next
    one starts only when the previous one, rollback included, is done.

    @param routes: Route pattern to its stash names, in configuration order.
    """

    log = Logger()

    def __init__(
        self,
        front: FrontQueue,
        workers: Mapping[str, StashWorker],
        routes: Mapping[str, Sequence[str]],
        spool: Spool,
        failQueue: FileFailQueue,
        records: UOWRecords,
    ) -> None:
        self._front = front
        self._workers = workers
        self._routes = routes
        self._spool = spool
        self._failQueue = failQueue
        self._records = records
        self._tails: dict[str, Deferred[None]] = {}
        self._loop: Deferred[None] | None = None

    def start(self) -> None:
        """
        Start taking UOWs from the front queue.
        """
        self._loop = Deferred.fromCoroutine(self._run())

    def stop(self) -> None:
        """
        Stop taking UOWs; those under way go on to their end.
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
            self.dispatch(admission)

    def dispatch(self, admission: Admission) -> None:
        """
        Settle the admitted UOW after every earlier UOW on its key.
        """
        uow = admission.uow
        self._records.begin(uow)
        previous = self._tails.get(uow.key)
        settled = Deferred.fromCoroutine(self._settleAfter(previous, admission))
        self._tails[uow.key] = settled

        def forget(result: None) -> None:
            if self._tails.get(uow.key) is settled:
                del self._tails[uow.key]

        settled.addCallback(forget)

    async def _settleAfter(self, previous: Deferred[None] | None, admission: Admission) -> None:
        if previous is not None:
            await previous
        try:
            report = await self.settle(admission.uow)
        except Exception:
            # A fault of the pipeline itself, not of a stash. The spool file
            # stays, so the UOW is not lost: recovery re-drives it.
            self.log.failure("UOW {uow} could not be settled", uow=admission.uow.id)
            self._records.finish(admission.uow, UOWState.received, None)
            admission.done.errback()
            return
        admission.done.callback(report)

    async def settle(self, uow: UnitOfWork) -> Report:
        """
        Deliver C{uow} to every stash of its route and settle the outcome.

        @return: The report of this attempt.
        """
        names = self._routes[uow.route]
        self._records.applying(uow)
        pending = []
        for name in names:
            delivery = Delivery(uow, Deferred())
            self._workers[name].queue.put(delivery)
            pending.append(delivery.verdict)
        results = await DeferredList(pending, consumeErrors=True)
        verdicts: dict[str, Verdict] = {}
        for name, (ok, value) in zip(names, results):
            # A worker turns every error into a verdict; a failure here is a bug.
            verdicts[name] = value if ok else Verdict.failed(500, str(value.value))  # type: ignore[attr-defined]
        report = Report.fromVerdicts(uow, verdicts)
        if report.outcome is Outcome.stored:
            await self._everywhere("commit", uow, names)
            await self._forgetSpool(uow)
            state = UOWState.stored
        else:
            unfinished = await self._everywhere("rollback", uow, list(reversed(names)))
            if unfinished or report.outcome is Outcome.queued:
                state = UOWState.queued if report.outcome is Outcome.queued else UOWState.stuck
                entry = self._failQueue.failed(report, uow.route, uow.attempt, tuple(unfinished))
                try:
                    await self._failQueue.put(entry)
                except Exception:
                    self.log.failure(
                        "UOW {uow} could not be recorded in the fail queue;"
                        " its spool file stays for recovery",
                        uow=uow.id,
                    )
            else:
                await self._forgetSpool(uow)
                state = UOWState.rejected
        self._logReport(uow, report, state)
        self._records.finish(uow, state, report)
        return report

    async def _everywhere(self, step: str, uow: UnitOfWork, names: Sequence[str]) -> list[str]:
        """
        Run C{commit} or C{rollback} on each named stash, one after another.

        @return: The names of the stashes where it failed.
        """
        failed = []
        for name in names:
            stash = self._workers[name].stash
            try:
                await getattr(stash, step)(uow)
            except Exception:
                self.log.failure(
                    "stash {stash} failed to {step} UOW {uow}", stash=name, step=step, uow=uow.id
                )
                failed.append(name)
        return failed

    async def _forgetSpool(self, uow: UnitOfWork) -> None:
        try:
            await self._spool.delete(uow.id)
        except Exception:
            # Settled all the same; a replay finds every stash already done.
            self.log.failure("spool file of UOW {uow} could not be deleted", uow=uow.id)

    def _logReport(self, uow: UnitOfWork, report: Report, state: UOWState) -> None:
        emit = self.log.info if state is UOWState.stored else self.log.warn
        if state is UOWState.stuck:
            emit = self.log.error
        emit(
            "UOW {uow} {method} {key}: {state} ({status})",
            uow=uow.id,
            method=uow.method,
            key=uow.key,
            route=uow.route,
            attempt=uow.attempt,
            state=state.value,
            status=report.status,
            report=report.asRecord(),
        )
