"""
Many timeouts on one timer.
"""

from __future__ import annotations

from bisect import insort
from collections import deque
from typing import TypeVar

from twisted.internet.defer import CancelledError, Deferred, TimeoutError
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.python.failure import Failure

T = TypeVar("T")


class _Watch:
    __slots__ = ("deadline", "deferred", "seconds", "timedOut")

    def __init__(self, deadline: float, deferred: Deferred[object], seconds: float) -> None:
        self.deadline = deadline
        self.deferred: Deferred[object] | None = deferred
        self.seconds = seconds
        self.timedOut = False


class Deadlines:
    """
    Times out Deferreds as L{Deferred.addTimeout} does, with one timer for
    all of them instead of one each.

    On the hot path every request sets several timeouts (its own, and one
    per stash call and commit) that almost never expire. A timer each costs
    the reactor a push onto its heap of timed calls, and a cancellation
    that stays on that heap until it is rebuilt: five of them cost about 3 %
    of the reactor thread's time per request (C{python -m bench.timers}).
    Timeouts of one length expire in the order they were set, so here they
    wait in a queue, and one timer is due when the oldest is; a Deferred
    that has fired leaves the queue once everything set before it has.
    """

    def __init__(self, clock: IReactorTime) -> None:
        self._clock = clock
        self._queue: deque[_Watch] = deque()
        self._timer: IDelayedCall | None = None

    def __len__(self) -> int:
        """
        How many timeouts are set, counting those whose Deferred has fired
        but that still wait behind an older one.
        """
        return len(self._queue)

    def watch(self, deferred: Deferred[T], seconds: float) -> Deferred[T]:
        """
        Cancel C{deferred} if it has not fired within C{seconds}; it then
        fails with L{TimeoutError} instead of L{CancelledError}. Like
        L{Deferred.addTimeout}, the timeout covers the callbacks added
        before this call, and none added after it.

        @return: C{deferred}.
        """
        watch = _Watch(self._clock.seconds() + seconds, deferred, seconds)  # type: ignore[arg-type]
        deferred.addBoth(self._fired, watch)
        if watch.deferred is None:
            return deferred  # it had its result already
        queue = self._queue
        if not queue or queue[-1].deadline <= watch.deadline:
            queue.append(watch)
        else:
            # A shorter timeout than the last one (after a reload), or a
            # clock set back: keep the queue in deadline order.
            insort(queue, watch, key=lambda w: w.deadline)
        if self._timer is None or queue[0] is watch:
            self._schedule()
        return deferred

    def _fired(self, result: T | Failure, watch: _Watch) -> T | Failure:
        watch.deferred = None
        queue = self._queue
        while queue and queue[0].deferred is None:
            queue.popleft()
        if watch.timedOut and isinstance(result, Failure):
            result.trap(CancelledError)
            raise TimeoutError(watch.seconds, "Deferred")
        return result

    def _schedule(self) -> None:
        """
        Set the timer for the oldest deadline, if any.
        """
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        if self._queue:
            delay = max(0.0, self._queue[0].deadline - self._clock.seconds())
            self._timer = self._clock.callLater(delay, self._expire)

    def _expire(self) -> None:
        now = self._clock.seconds()
        queue = self._queue
        while queue and (queue[0].deadline <= now or queue[0].deferred is None):
            watch = queue.popleft()
            if watch.deferred is not None:
                watch.timedOut = True
                watch.deferred.cancel()
        self._schedule()
