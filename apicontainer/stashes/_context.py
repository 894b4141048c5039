"""
What every stash factory is given, and the errback most stashes share.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Sequence, TypeVar

from attrs import frozen
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from ..blocking import Blocking
from ..storage import numberingOf
from ..uow import UnitOfWork, Verdict

T = TypeVar("T")


@frozen
class StashContext:
    """
    What a stash factory may use besides its own options.

    @ivar clock: The clock every wait and timeout runs on.
    @ivar reactor: The reactor, for stashes that open connections (in the
        server, the same object as C{clock}).
    @ivar dataDir: The data directory; relative paths in stash options are
        resolved against it.
    @ivar blocking: A shared runner for short blocking calls.
    @ivar serial: Makes a runner of the stash's own that runs one call at a
        time, in the order given: for a driver whose connection must not be
        shared between threads (C{serial(name)}). In the server it has a
        C{release()} that ends its thread: a stash calls it once stopped
        (L{released}).
    """

    clock: IReactorTime
    dataDir: Path
    blocking: Blocking
    serial: Callable[[str], Blocking]
    reactor: Any = None

    def path(self, value: str) -> Path:
        """
        Resolve a path option against the data directory.
        """
        return self.dataDir / value

    def numbering(self) -> str | None:
        """
        The name of the numbering of the UOWs this server delivers (blocking:
        call it from a stash's start or later). A store that other machines
        reach records it beside its data and refuses UOWs of another
        numbering (L{claimProblem}). L{None} before the data directory is
        opened.
        """
        return numberingOf(self.dataDir)


def released(runner: Blocking, stopped: Deferred[T]) -> Deferred[T]:
    """
    Release C{runner}, a runner from C{StashContext.serial}, once C{stopped}
    (a stash's stop through it) has succeeded: its thread is idle then, and
    ends at once. A stop that failed or was given up on may still hold the
    thread, which is left to it. A runner without C{release()} (an inline
    one, in unit tests) is left as it is.
    """

    def release(result: T) -> T:
        done = getattr(runner, "release", None)
        if done is not None:
            done()
        return result

    return stopped.addCallback(release)


class ForeignNumbering(Exception):
    """
    A store already holds writes whose UOWs another data directory numbered.
    """


def claimProblem(stash: str, store: str, theirs: str, ours: str) -> ForeignNumbering | None:
    """
    The error of stash C{stash} when the numbering recorded in C{store}
    (C{theirs}) is not this server's (C{ours}), in one line; L{None} if it is.
    """
    if theirs == ours:
        return None
    return ForeignNumbering(
        f"stash {stash}: {store} holds writes numbered by another api-container data directory"
        f" ({theirs}; this one is {ours}). Servers on the file spool number their UOWs each on"
        " its own, so they would overwrite each other's writes: give each server its own table"
        " or prefix (see docs/stashes.md)"
    )


_log = Logger(namespace="apicontainer.stashes")


def unavailable(
    stash: Any, uow: UnitOfWork, *errors: type[BaseException]
) -> Callable[[Failure], Verdict]:
    """
    An errback for a stash call: one of C{errors} means the destination is
    down or broken, a 503 verdict (logged as a warning, the UOW is retried);
    anything else goes on as a failure (a 500 verdict).
    """

    def verdict(reason: Failure) -> Verdict:
        reason.trap(*errors)
        _log.warn(
            "stash {stash} could not store UOW {uow}: {error}",
            stash=stash.name,
            uow=uow.id,
            error=str(reason.value).strip() or type(reason.value).__name__,
        )
        return Verdict.failed(503, f"{type(stash).__name__}: {type(reason.value).__name__}: {reason.value}".strip())

    return verdict


def verdictsOf(
    stash: Any, uows: Sequence[UnitOfWork], outcomes: Sequence[tuple[bool, Any]], *errors: type[BaseException]
) -> list[Verdict]:
    """
    The verdicts of a batch call, from the outcome of each of its UOWs (a
    L{GroupCommit} batch's): a verdict, or a failure, which is a 503 if it
    is one of C{errors} (as with L{unavailable}), else a 500.
    """
    verdicts = []
    for uow, (ok, value) in zip(uows, outcomes):
        if ok:
            verdicts.append(value)
        elif value.check(*errors):
            verdicts.append(unavailable(stash, uow, *errors)(value))
        else:
            _log.failure("stash {stash} raised on UOW {uow}", value, stash=stash.name, uow=uow.id)
            verdicts.append(Verdict.failed(500, f"{type(value.value).__name__}: {value.value}"))
    return verdicts


def allUnavailable(
    stash: Any, uows: Sequence[UnitOfWork], *errors: type[BaseException]
) -> Callable[[Failure], list[Verdict]]:
    """
    L{unavailable} for a batch call that failed as a whole: one of
    C{errors} is a 503 verdict for each UOW; anything else goes on as a
    failure.
    """

    def verdicts(reason: Failure) -> list[Verdict]:
        reason.trap(*errors)
        return [unavailable(stash, uow, *errors)(reason) for uow in uows]

    return verdicts
