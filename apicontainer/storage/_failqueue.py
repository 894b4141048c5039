"""
The fail queue: UOWs that failed with a 5xx wait here, durably, for a retry.

The C{file} backend keeps one JSON file per UOW, C{failed/<uow id>.json},
replaced atomically on each change; the UOW's spool file stays in the spool
until the UOW is stored, rejected or dropped.
"""

from __future__ import annotations

import builtins
import json
import random
from pathlib import Path
from typing import Any, Callable

from attrs import evolve, frozen
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from zope.interface import implementer

from ..blocking import Blocking
from ..interfaces import IFailQueue
from ..uow import Report, Status
from ._durable import makeDirectories, removeDurably, removeTemporaries, writeAtomically
from ._spoolfile import fileName


@frozen
class RetryPolicy:
    """
    Exponential backoff, C{initial * factor ** (attempts - 1)} capped at
    C{maxDelay}, of which a random half is taken off (jitter), so that UOWs
    that failed together do not all come back at once.
    """

    initial: float = 1.0
    factor: float = 2.0
    maxDelay: float = 300.0
    maxAttempts: int = 20

    def delayAfter(self, attempts: int) -> float:
        """
        How long to wait after the C{attempts}-th failed attempt.
        """
        return min(self.initial * self.factor ** max(attempts - 1, 0), self.maxDelay)

    def jittered(self, attempts: int, uniform: float) -> float:
        """
        L{delayAfter} less up to half of it: C{uniform} is in [0, 1).
        """
        return self.delayAfter(attempts) * (0.5 + uniform / 2)


@frozen
class FailedUOW:
    """
    One entry of the fail queue.

    @ivar uow: The UOW id; its spool file holds the request.
    @ivar attempts: How many attempts have failed.
    @ivar report: The last attempt's report.
    @ivar nextAttemptAt: When the next attempt is due (POSIX seconds on the
        queue's clock), or L{None} when none is scheduled.
    @ivar rollbackFailed: The stashes whose rollback failed in the last
        attempt; they may hold part of the UOW until it is retried or rolled
        back again.
    @ivar compensate: The UOW was rejected (4xx) but a rollback failed: its
        retries only roll back, and it ends rejected, or stuck.
    """

    uow: int
    key: str
    route: str
    state: Status
    attempts: int
    report: Report
    firstFailedAt: float
    lastFailedAt: float
    nextAttemptAt: float | None
    rollbackFailed: tuple[str, ...] = ()
    compensate: bool = False

    def asJSON(self) -> dict[str, Any]:
        """
        The entry as stored and as the admin API shows it.
        """
        return {
            "uow": self.uow,
            "key": self.key,
            "route": self.route,
            "spool": f"spool/{fileName(self.uow)}",
            "state": self.state.value,
            "attempts": self.attempts,
            "report": self.report.asRecord(),
            "first_failed_at": self.firstFailedAt,
            "last_failed_at": self.lastFailedAt,
            "next_attempt_at": self.nextAttemptAt,
            "rollback_failed": list(self.rollbackFailed),
            "compensate": self.compensate,
        }

    @classmethod
    def fromJSON(cls, data: dict[str, Any]) -> FailedUOW:
        """
        The inverse of L{asJSON}.
        """
        return cls(
            uow=int(data["uow"]),
            key=data["key"],
            route=data["route"],
            state=Status(data["state"]),
            attempts=int(data["attempts"]),
            report=Report.fromJSON(data["report"]),
            firstFailedAt=float(data["first_failed_at"]),
            lastFailedAt=float(data["last_failed_at"]),
            nextAttemptAt=data["next_attempt_at"],
            rollbackFailed=tuple(data.get("rollback_failed", ())),
            compensate=bool(data.get("compensate", False)),
        )


class Taken(Exception):
    """
    Another server took the entry for an attempt: it was not dropped.
    """


@implementer(IFailQueue)
class FileFailQueue:
    """
    The embedded fail queue: a directory of JSON files, mirrored in memory.
    """

    def __init__(
        self,
        directory: Path,
        blocking: Blocking,
        clock: IReactorTime,
        retry: RetryPolicy,
        uniform: Callable[[], float] = random.random,
    ) -> None:
        self.directory = directory
        self.retry = retry
        self._uniform = uniform
        self._blocking = blocking
        self._clock = clock
        self._entries: dict[int, FailedUOW] = {}

    def open(self) -> list[Path]:
        """
        Create the directory and load every entry (blocking; at start-up).

        @return: The files that could not be read; they are left in place and
            named in the log by the caller.
        """
        makeDirectories(self.directory)
        removeTemporaries(self.directory)
        unreadable = []
        for path in sorted(self.directory.glob("*.json")):
            try:
                entry = FailedUOW.fromJSON(json.loads(path.read_bytes()))
            except (ValueError, KeyError, TypeError):
                unreadable.append(path)
                continue
            if entry.state is Status.retrying:
                # The process stopped during an attempt: it is due again.
                entry = evolve(entry, state=Status.queued)
            self._entries[entry.uow] = entry
        return unreadable

    def _path(self, uowId: int) -> Path:
        return self.directory / f"{uowId:020d}.json"

    def failed(
        self,
        report: Report,
        route: str,
        rollbackFailed: tuple[str, ...] = (),
        compensate: bool = False,
    ) -> FailedUOW:
        """
        Build the entry for a UOW whose latest attempt failed (see
        L{nextEntry}).
        """
        previous = self._entries.get(report.uow)
        now, uniform = self._clock.seconds(), self._uniform()
        return nextEntry(previous, report, route, self.retry, now, uniform, rollbackFailed, compensate)

    def put(self, entry: FailedUOW) -> Deferred[None]:
        data = json.dumps(entry.asJSON(), indent=1).encode("utf-8")

        def recorded(result: None) -> None:
            self._entries[entry.uow] = entry

        return self._blocking(writeAtomically, self._path(entry.uow), [data]).addCallback(
            recorded
        )

    def get(self, uowId: int) -> FailedUOW | None:
        return self._entries.get(uowId)

    def fresh(self, uowId: int) -> Deferred[FailedUOW | None]:
        # One server owns this queue: its memory is the latest.
        return succeed(self._entries.get(uowId))

    def list(self, state: Status | None = None) -> builtins.list[FailedUOW]:
        return [
            self._entries[uowId]
            for uowId in sorted(self._entries)
            if state is None or self._entries[uowId].state is state
        ]

    def markRetrying(self, uowId: int) -> Deferred[FailedUOW | None]:
        """
        Take the entry of C{uowId} for an attempt now, whatever its schedule
        or state, unless an attempt is already under way (in memory: one
        server owns this queue).

        @return: A Deferred that fires with the entry, marked as retrying,
            or with L{None}.
        """
        entry = self._entries.get(uowId)
        if entry is None or entry.state is Status.retrying:
            return succeed(None)
        entry = evolve(entry, state=Status.retrying)
        self._entries[uowId] = entry
        return succeed(entry)

    def takeDue(self) -> Deferred[builtins.list[FailedUOW]]:
        now = self._clock.seconds()
        due = []
        for entry in self.list(Status.queued):
            if entry.nextAttemptAt is not None and entry.nextAttemptAt <= now:
                entry = evolve(entry, state=Status.retrying)
                self._entries[entry.uow] = entry
                due.append(entry)
        return succeed(due)

    def drop(self, uowId: int) -> Deferred[FailedUOW | None]:
        entry = self._entries.get(uowId)
        if entry is None:
            return succeed(None)

        def removed(existed: bool) -> FailedUOW:
            self._entries.pop(uowId, None)
            return entry

        return self._blocking(removeDurably, self._path(uowId)).addCallback(removed)

    def __len__(self) -> int:
        return len(self._entries)


def nextEntry(
    previous: FailedUOW | None,
    report: Report,
    route: str,
    retry: RetryPolicy,
    now: float,
    uniform: float,
    rollbackFailed: tuple[str, ...] = (),
    compensate: bool = False,
) -> FailedUOW:
    """
    The fail queue entry of a UOW whose latest attempt failed, after its
    C{previous} entry, if any.

    The attempts are counted on from the previous entry. Below
    C{maxAttempts}, the next attempt is scheduled by the retry policy, with
    jitter (C{uniform} is in [0, 1)); then a UOW is parked, or stuck when
    only its rollback was being retried (C{compensate}).
    """
    attempts = (previous.attempts if previous else 0) + 1
    if attempts < retry.maxAttempts:
        state = Status.queued
        due: float | None = now + retry.jittered(attempts, uniform)
    else:
        state, due = (Status.stuck if compensate else Status.parked), None
    return FailedUOW(
        uow=report.uow,
        key=report.key,
        route=route,
        state=state,
        attempts=attempts,
        report=report,
        firstFailedAt=previous.firstFailedAt if previous else now,
        lastFailedAt=now,
        nextAttemptAt=due,
        rollbackFailed=rollbackFailed,
        compensate=compensate,
    )
