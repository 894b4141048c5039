"""
Group commit: operations that arrive while a batch is being made durable
wait and go together in the next batch, so that one thread-pool hop and one
fsync serve them all.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

from ..blocking import Blocking

Operation = tuple[Callable[..., Any], tuple[Any, ...]]
Result = tuple[bool, Any]


class GroupCommit:
    """
    Batches operations for a blocking C{runBatch}.

    C{runBatch(operations)} runs in the C{blocking} runner and returns, for
    each operation, C{(True, value)} or C{(False, Failure)}; it makes the
    batch durable before returning. If it raises, every operation of the
    batch fails with that error. One batch runs at a time.
    """

    def __init__(self, blocking: Blocking, runBatch: Callable[[Sequence[Operation]], list[Result]]) -> None:
        self._blocking = blocking
        self._runBatch = runBatch
        self._pending: list[tuple[Operation, Deferred[Any]]] = []
        self._running = False

    def submit(self, operation: Callable[..., Any], *args: Any) -> Deferred[Any]:
        """
        Run C{operation(*args)} in the next batch.

        @return: A Deferred that fires with its result once its batch is
            durable, or fails with its error (or the batch's).
        """
        done: Deferred[Any] = Deferred()
        self._pending.append(((operation, args), done))
        if not self._running:
            self._next()
        return done

    def _next(self) -> None:
        batch, self._pending = self._pending, []
        self._running = True

        def settled(outcomes: Any) -> None:
            # Callbacks below may submit more work, which then starts the
            # next batch at once; the check at the end must not start a
            # second one beside it.
            self._running = False
            if isinstance(outcomes, Failure):
                for _, done in batch:
                    done.errback(outcomes)
            else:
                for (_, done), (ok, value) in zip(batch, outcomes):
                    if ok:
                        done.callback(value)
                    else:
                        done.errback(value)
            if self._pending and not self._running:
                self._next()

        self._blocking(self._runBatch, [operation for operation, _ in batch]).addBoth(settled)


def each(operations: Sequence[Operation], run: Callable[[Operation], Any]) -> list[Result]:
    """
    Run every operation through C{run}, turning each error into a failed
    outcome: a helper for C{runBatch} implementations.
    """
    outcomes: list[Result] = []
    for operation in operations:
        try:
            outcomes.append((True, run(operation)))
        except Exception:
            outcomes.append((False, Failure()))
    return outcomes


def runEach(operations: Sequence[Operation]) -> list[Result]:
    """
    A C{runBatch} that calls every operation in turn and needs no sync of
    its own.
    """
    return each(operations, lambda operation: operation[0](*operation[1]))
