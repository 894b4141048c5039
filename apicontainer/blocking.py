"""
Where blocking calls (file I/O with fsync, database drivers) run.

Library code never blocks the reactor: it takes a L{Blocking} runner and calls
blocking functions through it. The server runs them in a thread pool; unit
tests run them inline, so that a test stays deterministic on a fake clock.
"""

from __future__ import annotations

from typing import Any, Callable, Protocol, TypeVar

from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.interfaces import IReactorFromThreads
from twisted.internet.threads import deferToThreadPool
from twisted.python.threadpool import ThreadPool

T = TypeVar("T")


class Blocking(Protocol):
    """
    Runs a blocking function somewhere that does not hold up the reactor.
    """

    def __call__(self, f: Callable[..., T], *args: Any, **kwargs: Any) -> Deferred[T]:
        """
        @return: A Deferred that fires with C{f(*args, **kwargs)}, or with
            its exception.
        """


def inThreadPool(reactor: IReactorFromThreads, pool: ThreadPool) -> Blocking:
    """
    Run blocking calls in C{pool}, delivering the results on the reactor.
    """

    def run(f: Callable[..., T], *args: Any, **kwargs: Any) -> Deferred[T]:
        return deferToThreadPool(reactor, pool, f, *args, **kwargs)

    return run


def inline(f: Callable[..., T], *args: Any, **kwargs: Any) -> Deferred[T]:
    """
    Run a blocking call right away, on the calling thread: for unit tests.
    """
    return maybeDeferred(f, *args, **kwargs)
