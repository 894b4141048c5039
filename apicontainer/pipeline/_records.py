"""
What became of each recent UOW, for C{GET /_uow/<id>}, and the UOWs the
running server holds unsettled.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

from attrs import define, frozen

from ..storage import FailedUOW
from ..uow import Report, Status, UnitOfWork


@define
class UOWRecord:
    """
    One UOW's state, and its last report once it has one.
    """

    uow: int
    key: str
    route: str
    state: Status
    attempt: int
    report: Report | None = None

    def asJSON(self) -> dict[str, Any]:
        """
        The record as the admin API shows it.
        """
        return {
            "uow": self.uow,
            "key": self.key,
            "route": self.route,
            "state": self.state.value,
            "attempt_id": self.attempt,
            "report": self.report.asRecord() if self.report else None,
        }


class UOWRecords:
    """
    The states of the UOWs under way and of the last C{keep} finished ones,
    in memory. Older final states are in the state store; this is only the
    fast path for what operators look at right after it happened, and a cap
    on memory.
    """

    def __init__(self, keep: int = 1000) -> None:
        self._keep = keep
        self._active: dict[int, UOWRecord] = {}
        self._finished: OrderedDict[int, UOWRecord] = OrderedDict()

    def begin(self, uow: UnitOfWork) -> None:
        """
        Record that C{uow} was spooled and waits for the fanout.
        """
        self._finished.pop(uow.id, None)
        self._active[uow.id] = UOWRecord(uow.id, uow.key, uow.route, Status.received, uow.attempt)

    def applying(self, uow: UnitOfWork) -> None:
        """
        Record that C{uow} went out to its stashes.
        """
        record = self._active.get(uow.id)
        if record is not None:
            record.state = Status.applying

    def finish(self, uow: UnitOfWork, state: Status, report: Report | None) -> None:
        """
        Record the final state of this attempt at C{uow}.
        """
        record = self._active.pop(uow.id, None) or UOWRecord(
            uow.id, uow.key, uow.route, state, uow.attempt
        )
        record.state, record.report = state, report
        self._finished[uow.id] = record
        while len(self._finished) > self._keep:
            self._finished.popitem(last=False)

    def mark(self, uowId: int, state: Status) -> None:
        """
        Change the state of a finished UOW (an operator dropped it).
        """
        record = self._finished.get(uowId)
        if record is not None:
            record.state = state

    def get(self, uowId: int) -> UOWRecord | None:
        """
        The record of C{uowId}, if it is under way or recent.
        """
        return self._active.get(uowId) or self._finished.get(uowId)

    def underWay(self) -> list[int]:
        """
        The ids of the UOWs spooled and not yet finished.
        """
        return list(self._active)

    @property
    def inFlight(self) -> int:
        """
        How many UOWs are spooled and not yet finished.
        """
        return len(self._active)


@frozen
class Unsettled:
    """
    A UOW whose outcome could not be made durable: an attempt failed inside
    the pipeline (the state store or the fail queue could not be written, a
    commit kept failing). Its spool file stays; the running server owns it
    and re-drives it when C{dueAt} comes, until it settles.

    @ivar entry: Its fail queue entry, when the attempt was a retry of one.
    @ivar tries: How many attempts in a row ended unsettled.
    @ivar dueAt: When it is re-driven next; L{None} while a re-drive is
        under way.
    @ivar reason: What went wrong last, for operators.
    """

    uow: UnitOfWork
    entry: FailedUOW | None
    tries: int
    dueAt: float | None
    reason: str

    def asJSON(self) -> dict[str, object]:
        """
        The UOW as the admin API shows it.
        """
        return {
            "uow": self.uow.id,
            "key": self.uow.key,
            "route": self.uow.route,
            "state": Status.unsettled.value,
            "attempt_id": self.uow.attempt,
            "unsettled_tries": self.tries,
            "next_attempt_at": self.dueAt,
            "reason": self.reason,
            "report": None,
        }
