"""
The fanout's calls on its stashes: deliveries, commits and rollbacks, of one
UOW or of a batch, each within its stash's timeout.
"""

from __future__ import annotations

from typing import Any, Sequence

from twisted.internet.defer import Deferred, DeferredList, maybeDeferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure

from .._crashpoints import reach
from ..storage import FailedUOW
from ..uow import Report, UnitOfWork, Verdict
from ._metrics import Metrics
from ._worker import Delivery, Routing

# Seconds to wait before each new try of a failed commit.
COMMIT_RETRIES = (0.1, 1.0)


class CommitFailed(Exception):
    """
    A stash could not commit a UOW that every stash had stored.
    """


class StashCalls:
    """
    Calls the stashes of a L{Routing} for the fanout: a batch stash once
    for a batch of UOWs, any other once for each.
    """

    log = Logger()

    def __init__(self, clock: IReactorTime, metrics: Metrics | None = None) -> None:
        self._clock = clock
        self._metrics = metrics

    async def deliver(self, uows: Sequence[UnitOfWork], routing: Routing) -> list[Report]:
        """
        Put C{uows} on the routing queue of each stash of their routes, as
        one delivery per stash, and gather each UOW's report.
        """
        batches = _byStash(uows, routing)
        pending = []
        for name, indexes in batches.items():
            delivery = Delivery([uows[index] for index in indexes], Deferred())
            routing.workers[name].queue.put(delivery)
            pending.append(delivery.verdicts)
        results = await DeferredList(pending, consumeErrors=True)
        verdicts: list[dict[str, Verdict]] = [{} for _ in uows]
        for (name, indexes), (ok, value) in zip(batches.items(), results):
            # A worker turns every error into a verdict; a failure here is a bug.
            given = value if ok else [Verdict.failed(500, str(getattr(value, "value", value)))] * len(indexes)
            for position, index in enumerate(indexes):
                verdicts[index][name] = given[position]
        return [
            Report.fromVerdicts(uow, {name: verdicts[index][name] for name in routing.routes[uow.route]})
            for index, uow in enumerate(uows)
        ]

    async def commit(
        self, uow: UnitOfWork, names: Sequence[str], routing: Routing, uncommitted: Sequence[str] | None = None
    ) -> None:
        """
        Commit C{uow} everywhere (or, with C{uncommitted}, where its
        batch's commit failed). A stash whose commit fails is asked again
        after each of L{COMMIT_RETRIES} seconds (a commit is idempotent; a
        filesystem stash whose process ended commits through a new one).

        @raise CommitFailed: A commit still failed: the UOW is not settled,
            and its spool file stays for recovery (its write may not be
            durable, so it gets no 200).
        """
        if uncommitted is None:
            failed = await self.everywhere("commit", uow, names, routing)
        else:
            failed = list(uncommitted)
        for delay in COMMIT_RETRIES:
            if not failed:
                return
            await deferLater(self._clock, delay, lambda: None)
            failed = await self.everywhere("commit", uow, failed, routing)
        if failed:
            raise CommitFailed(f"UOW {uow.id} could not be committed in {', '.join(failed)}")

    async def commitBatch(self, uows: Sequence[UnitOfWork], routing: Routing) -> dict[int, list[str]]:
        """
        Commit C{uows} everywhere, all at once: one call on each stash for
        the UOWs it stored.

        @return: For each UOW whose commit failed on some stash, those
            stashes.
        """
        batches = {name: [uows[index] for index in indexes] for name, indexes in _byStash(uows, routing).items()}
        calls = [self.commitOn(name, batch, routing) for name, batch in batches.items()]
        _duringCommit(calls)
        uncommitted: dict[int, list[str]] = {}
        for (name, batch), (_, oks) in zip(batches.items(), await DeferredList(calls)):
            for uow, ok in zip(batch, oks):
                if not ok:
                    uncommitted.setdefault(uow.id, []).append(name)
        return uncommitted

    def commitOn(self, name: str, uows: Sequence[UnitOfWork], routing: Routing) -> Deferred[list[bool]]:
        """
        Commit C{uows} on stash C{name}, within its C{timeout_s}: in one call
        if it provides L{IBatchStash}.

        @return: A Deferred that fires with whether each committed (a
            failure is logged).
        """
        worker = routing.workers[name]
        if worker.batched is None or len(uows) == 1:
            calls = [self.onStash("commit", uow, name, routing) for uow in uows]
            return DeferredList(calls).addCallback(lambda results: [ok for _, ok in results])

        def committed(results: Sequence[Failure | None]) -> list[bool]:
            if len(results) != len(uows):
                raise ValueError(f"{len(results)} results for {len(uows)} UOWs")
            for uow, result in zip(uows, results):
                if result is not None:
                    self.log.failure("stash {stash} failed to commit UOW {uow}", result, stash=name, uow=uow.id)
            return [result is None for result in results]

        def failed(reason: Failure) -> list[bool]:
            ids = ", ".join(str(uow.id) for uow in uows)
            self.log.failure("stash {stash} failed to commit UOWs {uows}", reason, stash=name, uows=ids)
            return [False] * len(uows)

        call = worker.deadlines.watch(maybeDeferred(worker.batched.commitBatch, uows), worker.timeout)
        return call.addCallback(committed).addErrback(failed)

    async def everywhere(
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
            calls = [self.onStash(step, uow, name, routing) for name in names]
            _duringCommit(calls)
            done = await DeferredList(calls)
            return [name for name, (_, ok) in zip(names, done) if not ok]
        failed = []
        for index, name in enumerate(names):
            ok = await self.onStash(step, uow, name, routing)
            if index == 0:
                reach(f"during-{step}")
            if self._metrics is not None:
                self._metrics.of(self._metrics.rollbacks, name, "ok" if ok else "failed").inc()
            if not ok:
                failed.append(name)
        return failed

    def onStash(self, step: str, uow: UnitOfWork, name: str, routing: Routing) -> Deferred[bool]:
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


def _byStash(uows: Sequence[UnitOfWork], routing: Routing) -> dict[str, list[int]]:
    """
    The indexes in C{uows} of the UOWs whose route has each stash, by
    stash name.
    """
    batches: dict[str, list[int]] = {}
    for index, uow in enumerate(uows):
        for name in routing.routes[uow.route]:
            batches.setdefault(name, []).append(index)
    return batches


def _duringCommit(calls: list[Deferred[Any]]) -> None:
    """
    Reach the C{during-commit} crash point once the first of several
    commits (on different stashes) has answered.
    """

    def reached(result: object) -> object:
        reach("during-commit")
        return result

    if len(calls) > 1:
        calls[0].addCallback(reached)


def toRollBack(uow: UnitOfWork, report: Report, names: Sequence[str], entry: FailedUOW | None) -> list[str]:
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
