"""
Deadlines: many timeouts on one timer, with Deferred.addTimeout's behaviour.
"""

from __future__ import annotations

import pytest
from twisted.internet.defer import CancelledError, Deferred, TimeoutError, succeed
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from apicontainer.pipeline._deadlines import Deadlines


def outcome(d: Deferred[object]) -> list[object]:
    results: list[object] = []
    d.addBoth(results.append)
    return results


def test_times_out_at_its_deadline() -> None:
    clock = Clock()
    cancelled = []
    d: Deferred[object] = Deferred(cancelled.append)
    results = outcome(Deadlines(clock).watch(d, 5))
    clock.advance(4.9)
    assert results == [] and cancelled == []
    clock.advance(0.1)
    assert cancelled == [d]
    [failure] = results
    assert isinstance(failure, Failure) and failure.check(TimeoutError)


def test_a_fired_deferred_keeps_its_result_and_is_forgotten() -> None:
    clock = Clock()
    deadlines = Deadlines(clock)
    d: Deferred[object] = Deferred()
    results = outcome(deadlines.watch(d, 5))
    d.callback("stored")
    assert len(deadlines) == 0
    clock.advance(10)
    assert results == ["stored"]
    assert clock.getDelayedCalls() == []


def test_one_timer_for_many() -> None:
    clock = Clock()
    deadlines = Deadlines(clock)
    watched = [deadlines.watch(Deferred(), 30) for _ in range(100)]
    for d in watched:
        d.addErrback(lambda f: None)
    assert len(clock.getDelayedCalls()) == 1
    for d in watched[:50]:
        d.callback(None)
    assert len(deadlines) == 50
    clock.advance(30)
    assert len(deadlines) == 0


def test_a_fired_one_behind_a_pending_one_waits_without_its_deferred() -> None:
    clock = Clock()
    deadlines = Deadlines(clock)
    older: Deferred[object] = Deferred()
    olderResults = outcome(deadlines.watch(older, 5))
    clock.advance(1)
    newer: Deferred[object] = Deferred()
    newerResults = outcome(deadlines.watch(newer, 5))
    newer.callback("done")
    assert len(deadlines) == 2  # behind the older one
    clock.advance(4)
    assert isinstance(olderResults[0], Failure) and olderResults[0].check(TimeoutError)
    assert len(deadlines) == 0
    clock.advance(10)
    assert newerResults == ["done"]


def test_each_expires_at_its_own_deadline() -> None:
    clock = Clock()
    deadlines = Deadlines(clock)
    first = outcome(deadlines.watch(Deferred(), 5))
    clock.advance(2)
    second = outcome(deadlines.watch(Deferred(), 5))
    clock.advance(3)
    assert len(first) == 1 and second == []
    clock.advance(1.9)
    assert second == []
    clock.advance(0.1)
    assert len(second) == 1 and second[0].check(TimeoutError)  # type: ignore[attr-defined]


def test_a_shorter_timeout_after_a_longer_one() -> None:
    """
    After a reload that shortens a timeout, the new one expires first.
    """
    clock = Clock()
    deadlines = Deadlines(clock)
    long = outcome(deadlines.watch(Deferred(), 60))
    short = outcome(deadlines.watch(Deferred(), 1))
    clock.advance(1)
    assert long == [] and len(short) == 1 and short[0].check(TimeoutError)  # type: ignore[attr-defined]
    clock.advance(59)
    assert len(long) == 1
    assert clock.getDelayedCalls() == []


def test_cancelled_by_someone_else_stays_cancelled() -> None:
    clock = Clock()
    d: Deferred[object] = Deferred()
    results = outcome(Deadlines(clock).watch(d, 5))
    d.cancel()
    assert isinstance(results[0], Failure) and results[0].check(CancelledError)


def test_a_timed_out_deferred_that_fails_otherwise_keeps_its_failure() -> None:
    clock = Clock()

    def canceller(d: Deferred[object]) -> None:
        d.errback(ValueError("gave up"))

    results = outcome(Deadlines(clock).watch(Deferred(canceller), 5))
    clock.advance(5)
    assert isinstance(results[0], Failure) and results[0].check(ValueError)


def test_an_already_fired_deferred_sets_no_timer() -> None:
    clock = Clock()
    deadlines = Deadlines(clock)
    results = outcome(deadlines.watch(succeed("now"), 5))
    assert results == ["now"]
    assert len(deadlines) == 0 and clock.getDelayedCalls() == []


def test_a_timeout_that_sets_another() -> None:
    """
    A Deferred's callbacks may set a new timeout while the timer runs: it
    gets its own deadline, and one timer is left.
    """
    clock = Clock()
    deadlines = Deadlines(clock)
    again: list[list[object]] = []

    def retry(failure: Failure) -> None:
        again.append(outcome(deadlines.watch(Deferred(), 5)))

    deadlines.watch(Deferred(), 5).addErrback(retry)
    clock.advance(5)
    assert len(again) == 1 and again[0] == []
    assert len(clock.getDelayedCalls()) == 1
    clock.advance(5)
    assert again[0][0].check(TimeoutError)  # type: ignore[attr-defined]


@pytest.mark.parametrize("seconds", [0, 0.5])
def test_short_timeouts(seconds: float) -> None:
    clock = Clock()
    results = outcome(Deadlines(clock).watch(Deferred(), seconds))
    clock.advance(seconds)
    assert results[0].check(TimeoutError)  # type: ignore[attr-defined]



def test_a_deferred_that_waits_on_another() -> None:
    """
    A Deferred that has been called but waits on the Deferred a callback
    returned is still under way: its timeout cancels the one it waits on.
    """
    clock = Clock()
    deadlines = Deadlines(clock)
    inner: Deferred[object] = Deferred()
    outer: Deferred[object] = succeed(None).addCallback(lambda _: inner)
    results = outcome(deadlines.watch(outer, 5))
    assert len(clock.getDelayedCalls()) == 1
    clock.advance(5)
    assert results[0].check(TimeoutError)  # type: ignore[attr-defined]
    assert inner.called


def test_an_expiry_whose_callbacks_wait_leaves_nothing_behind() -> None:
    """
    A timed-out Deferred that is paused runs its callbacks later; the fired
    ones behind it leave the queue at once all the same, and no timer stays
    set for them.
    """
    clock = Clock()
    deadlines = Deadlines(clock)
    paused: Deferred[object] = Deferred()
    paused.pause()
    results = outcome(deadlines.watch(paused, 5))
    clock.advance(1)
    later: Deferred[object] = Deferred()
    deadlines.watch(later, 5)
    later.callback("done")
    assert len(deadlines) == 2
    clock.advance(4)
    assert results == []
    assert len(deadlines) == 0 and clock.getDelayedCalls() == []
    paused.unpause()
    assert results[0].check(TimeoutError)  # type: ignore[attr-defined]
