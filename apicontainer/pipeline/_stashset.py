"""
The configured stashes as one set: built from the configuration, started
all or none, stopped within their timeouts.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence, TypeVar

from twisted.internet import defer, error
from twisted.internet.defer import Deferred, DeferredList, maybeDeferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from ..config import Config, ConfigError, StashSpec, stashFactory
from ..interfaces import ILocalStorage, IReader, IStartable, IStash
from ..stashes import StashContext

T = TypeVar("T")

_log = Logger(namespace="apicontainer.pipeline.container")


def buildStashes(
    config: Config,
    context: StashContext,
    reuse: Callable[[str, StashSpec], IStash | None] = lambda name, spec: None,
) -> dict[str, IStash]:
    """
    Build every configured stash, in configuration order, and check that
    each route's C{read} names readers.

    @param reuse: Gives a stash already running for a name and spec, if it
        can serve as it is (a reload).
    @raise ConfigError: A stash's options are wrong, a read component
        cannot read, or a stash keeps its data on this machine beside a
        shared spool.
    """
    stashes: dict[str, IStash] = {}
    for name, spec in config.stashes.items():
        kept = reuse(name, spec)
        if kept is not None:
            stashes[name] = kept
            continue
        stash = stashFactory(spec.type)(spec, context)
        if spec.options is not None:
            spec.options.rejectUnknown()
        if not IStash.providedBy(stash):
            raise ConfigError(f"stash type {spec.type!r} built {stash!r}, which is not an IStash")
        if config.jetstream is not None and ILocalStorage.providedBy(stash):
            raise ConfigError(
                f"{config.source}: stashes.{name}: a {spec.type} stash keeps data on this machine's"
                " disk, and with spool.backend: jetstream any instance may apply any UOW, so the"
                " instances' copies would diverge; use a store every instance reaches (postgres,"
                " redis)"
            )
        stashes[name] = stash
    for route in config.routes:
        for name in route.read:
            if not IReader.providedBy(stashes[name]):
                assert route.section is not None
                raise route.section.error(
                    "read", f"stash {name!r} (type {config.stashes[name].type}) cannot read"
                )
    return stashes



def shielded(running: Deferred[T]) -> Deferred[T]:
    """
    A Deferred that fires with the result of C{running}, and whose
    cancellation (or timeout) leaves C{running} to go on.
    """
    outer: Deferred[T] = Deferred()

    def relay(result: Any) -> None:
        if not outer.called:
            outer.callback(result)

    running.addBoth(relay)
    return outer



async def startAll(
    stashes: Sequence[tuple[str, IStash, float]], clock: IReactorTime
) -> tuple[str, str] | None:
    """
    Start each of C{stashes} (name, stash, timeout in seconds) in turn; if
    one cannot start in time, stop those already started.

    @return: L{None} when all started, else the name of the one that did not
        and why.
    """
    started: list[tuple[str, IStash, float]] = []
    for name, stash, timeout in stashes:
        if not IStartable.providedBy(stash):
            continue
        try:
            await maybeDeferred(stash.start).addTimeout(timeout, clock)
        except (defer.TimeoutError, error.TimeoutError):
            problem = f"did not start within its timeout_s ({timeout:g}s)"
        except Exception as e:
            problem = str(e).strip() or type(e).__name__
        else:
            started.append((name, stash, timeout))
            continue
        await stopAll(started, clock)
        return name, problem
    return None



async def stopAll(stashes: Sequence[tuple[str, IStash, float]], clock: IReactorTime) -> None:
    """
    Stop each of C{stashes} (name, stash, timeout in seconds), all at once;
    one that does not stop in time is left behind, logged.
    """
    names, stops = [], []
    for name, stash, timeout in stashes:
        if IStartable.providedBy(stash):
            names.append(name)
            stops.append(maybeDeferred(stash.stop).addTimeout(timeout, clock))
    for name, (ok, result) in zip(names, await DeferredList(stops, consumeErrors=True)):
        if not ok:
            _log.failure("stash {stash} failed to stop", result, stash=name)
