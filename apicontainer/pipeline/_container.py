"""
The container: spool, front queue, fanout, stash workers and fail queue,
built from a configuration and wired together.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any, Callable

from twisted.internet import defer, error
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from ..blocking import Blocking
from ..config import Config, ConfigError, StashSpec
from ..interfaces import ILocalStorage, IReader, IStartable, IStash
from ..stashes import StashContext
from ..storage import (
    FAILQUEUE_BACKENDS,
    SPOOL_BACKENDS,
    CorruptSpoolFile,
    FailedUOW,
    PartitionConsumers,
    StateRecord,
    Verdicts,
    nameNumbering,
)
from ..uow import Status, UnitOfWork
from ._fanout import Fanout
from ._frontqueue import Admission, FrontQueue
from ._housekeeping import Housekeeping
from ._idempotency import IdempotencyIndex
from ._metrics import Metrics
from ._records import UOWRecords
from ._recovery import recover
from ._retry import RetryEngine
from ._shared import SharedDelivery, SharedFront, SharedIdempotency, clusterStatus
from ._stashset import buildStashes, shielded, startAll, stopAll
from ._worker import Routing, StashWorker

# What a write costs on the spool's disk besides its body: the spool file's
# head, its final state in the state store and a fail queue record.
SPOOL_OVERHEAD = 64 * 1024


class NotFailed(Exception):
    """
    The UOW is not in the fail queue.
    """


class BeingRetried(Exception):
    """
    The UOW is in the fail queue, and an attempt at it is under way.
    """


class Container:
    """
    The pipeline of one server.

    Build it, call L{open} (blocking, at start-up), then L{start}, which
    starts the stashes and recovers what a crash left behind; then submit
    requests with L{submit}.

    @ivar readers: Route pattern to its read components, in order.
    """

    log = Logger()

    def __init__(
        self,
        config: Config,
        stashes: dict[str, IStash],
        clock: IReactorTime,
        blocking: Blocking,
        serial: Blocking | None = None,
        processes: Any = None,
        uniform: Callable[[], float] = random.random,
        turns: IReactorTime | None = None,
    ) -> None:
        """
        @param blocking: Runs short blocking calls (file I/O).
        @param serial: Runs the spool's and the state store's calls, one at
            a time, on one thread: the two take turns there rather than
            contend for the GIL from two. By default C{blocking}, which must
            then be serial too.
        @param processes: The reactor that starts the journal's child
            process, which then writes the spool and the final states
            (L{apicontainer.storage._journal}); without it, C{serial} does.
        @param uniform: The random source of retry jitter.
        @param turns: The reactor whose turns the fanout batches UOWs by
            (L{Fanout}'s C{turns}).
        """
        self.config = config
        self.clock = clock
        self.stashes = stashes
        dataDir = Path(config.dataDir)
        backend = SPOOL_BACKENDS[config.spoolBackend](dataDir, blocking, serial, processes, config.jetstream)
        self._turns = turns
        self.spool = backend.spool
        self.ids = backend.ids
        self.states = backend.states
        self.journal = backend.journal
        # The cluster of a shared spool (jetstream), else None.
        self.link = backend.link
        self.failQueue = FAILQUEUE_BACKENDS[config.failqueueBackend](
            dataDir, blocking, clock, config.retry, uniform, spool=backend
        )
        self.idempotency = (IdempotencyIndex if self.link is None else SharedIdempotency)(
            self.states, self.failQueue
        )
        self.consumers: PartitionConsumers | None = None
        self.records = UOWRecords()
        self.metrics = Metrics()
        self.workers = {
            name: StashWorker(stash, clock, spec.concurrency, spec.timeout, spec.part, self.metrics)
            for (name, spec), stash in zip(config.stashes.items(), stashes.values())
        }
        self.routes = {
            route.path: [name for name in config.stashes if name in route.stashes]
            for route in config.routes
        }
        self.readers: dict[str, list[IReader]] = {
            route.path: [IReader(stashes[name]) for name in route.read] for route in config.routes
        }
        self.front: FrontQueue | SharedFront | None = None
        self.fanout: Fanout | None = None
        self.retries: RetryEngine | None = None
        self.recovered = False
        self.startFailures: dict[str, str] = {}
        self.housekeeping = Housekeeping(self)
        # The device of each directory a write lands in, for lacksRoom.
        self._devices: dict[Path, int] = {}

    def lacksRoom(self, route: str, size: int, reserve: int) -> Path | None:
        """
        Whether a write of a body of C{size} bytes on C{route} would leave
        less than C{reserve} bytes free on any disk it lands on: the spool's
        (the spool file, its final state and fail queue record) and those of
        the route's stashes that keep data on this machine (L{ILocalStorage}),
        adding up what lands on the same disk. One C{statvfs} per disk, cheap
        enough for the reactor thread: each directory's device is looked up
        once.

        @return: A directory on the first disk without room, or L{None}.
        """
        needs: dict[int, tuple[Path, int]] = {}
        spending = [(self.spool.directory, size + SPOOL_OVERHEAD)]
        for name in self.routes.get(route, ()):
            stash = self.stashes[name]
            if ILocalStorage.providedBy(stash):
                spending.append((stash.location, stash.bytesFor(size)))
        for directory, cost in spending:
            device = self._devices.get(directory)
            if device is None:
                try:
                    device = self._devices[directory] = os.stat(directory).st_dev
                except OSError:
                    continue  # not there yet: the stash reports its own trouble
            path, total = needs.get(device, (directory, 0))
            needs[device] = (path, total + cost)
        for path, total in needs.values():
            try:
                stats = os.statvfs(path)
            except OSError:
                return path
            if stats.f_bavail * stats.f_frsize < total + reserve:
                return path
        return None

    def open(self) -> None:
        """
        Create or load the spool, the UOW id record, the fail queue and the
        state store (blocking: call it before the reactor runs).
        """
        self.spool.open()
        self.ids.open()
        for path in self.failQueue.open():
            self.log.error("fail queue entry {path} is unreadable; left in place", path=str(path))
        self.states.open()
        self.metrics.watch(self)
        if self.link is None:
            self.front = FrontQueue(self.ids, self.journal, self.idempotency.hold)
        else:
            verdicts = Verdicts(self.link)
            self.front = SharedFront(self.journal, self.ids, self.states, self.failQueue, verdicts, self.clock)
            self.link.onConnected.insert(0, self._numberFromStream)
        self.fanout = Fanout(
            self.front, self.workers, self.routes, self.spool, self.failQueue, self.states, self.journal,
            self.idempotency, self.records, self.clock, self.metrics, turns=self._turns,
        )
        self.retries = RetryEngine(
            self.clock,
            self.failQueue,
            self.fanout,
            self.front,
            self.spool,
            interval=min(self.config.retry.initial, 1.0),
            metrics=self.metrics,
        )
        if self.link is not None:
            assert isinstance(self.front, SharedFront)
            delivery = SharedDelivery(
                self.fanout, self.front, self.states, self.failQueue, self.spool, self.front.verdicts, self.clock
            )
            self.consumers = PartitionConsumers(self.link, delivery)

    def clusterStatus(self) -> dict[str, Any] | None:
        """
        The link to a shared spool's cluster (for C{/_health}), or L{None}.
        """
        return None if self.link is None else clusterStatus(self.link, self.consumers)

    async def _numberFromStream(self) -> None:
        """
        Name this data directory's UOW numbering after the stream, whose
        sequence numbers the UOWs (stores refuse UOWs of another numbering).
        """
        assert self.link is not None
        nameNumbering(Path(self.config.dataDir), self.link.numbering)

    async def start(self) -> None:
        """
        Start every stash, then the workers and the fanout; recover what a
        crash left behind; then start the retry engine.
        """
        assert self.fanout is not None and self.front is not None and self.retries is not None
        # Before recovery: the journal's child is ready only once the last
        # server's child (after a crash) has finished its batch.
        await self.journal.start()
        for name, stash in self.stashes.items():
            if IStartable.providedBy(stash):
                try:
                    await stash.start()
                except Exception as e:
                    # Like a destination that is down: its UOWs fail with a
                    # 5xx and wait in the fail queue until it works again.
                    self.startFailures[name] = str(e) or repr(e)
                    self.log.critical(
                        "stash {stash} could not start: {error}; its UOWs will fail until it works",
                        stash=name,
                        error=self.startFailures[name],
                    )
        for worker in self.workers.values():
            worker.start()
        self.fanout.start()
        counts = await recover(
            self.spool, self.states, self.failQueue, self.fanout, self.front, self.idempotency
        )
        for what, count in counts.items():
            self.metrics.recovered.labels(what).inc(count)
        if self.consumers is not None:
            self.consumers.start()
        self.recovered = True
        self.retries.start()
        self.housekeeping.start()

    async def reload(self, config: Config, context: StashContext) -> dict[str, list[str]]:
        """
        Switch to C{config} between UOWs: stashes whose spec is unchanged keep
        running; new and changed ones are built and started; UOWs under way
        finish with the stashes they started with, which are then stopped if
        no longer used. Nothing is switched if the new configuration is
        wrong.

        @return: Stash names by what happened to them: added, changed,
            removed, kept.
        @raise ConfigError: The new configuration is wrong, or changes what
            only a restart can (endpoints, data directory, fail queue
            backend); the old configuration stays in force.
        """
        assert self.fanout is not None
        for key, attribute in (
            ("listen", "listen"),
            ("admin_listen", "adminListen"),
            ("data_dir", "dataDir"),
            ("spool.backend", "spoolBackend"),
            ("spool", "jetstream"),
            ("failqueue.backend", "failqueueBackend"),
        ):
            if getattr(config, attribute) != getattr(self.config, attribute):
                raise ConfigError(f"{config.source}: {key}: changing it needs a restart")

        def same(name: str, spec: StashSpec) -> IStash | None:
            old = self.config.stashes.get(name)
            if old is not None and spec.options is not None and old.options is not None:
                if old.options.values() == spec.options.values():
                    return self.stashes[name]
            return None

        stashes = buildStashes(config, context, same)
        new = [
            (name, stashes[name], spec.timeout)
            for name, spec in config.stashes.items()
            if stashes[name] is not self.stashes.get(name)
        ]
        # Every new stash starts before anything switches: one that cannot
        # refuses the whole reload.
        refusal = await startAll(new, self.clock)
        if refusal is not None:
            name, problem = refusal
            raise ConfigError(f"{config.source}: stashes.{name}: could not start: {problem}")
        changes: dict[str, list[str]] = {"added": [], "changed": [], "removed": [], "kept": []}
        workers = {}
        for name, spec in config.stashes.items():
            if name in self.stashes and stashes[name] is self.stashes[name]:
                changes["kept"].append(name)
                workers[name] = self.workers[name]
                continue
            changes["changed" if name in self.stashes else "added"].append(name)
            self.startFailures.pop(name, None)
            worker = StashWorker(stashes[name], self.clock, spec.concurrency, spec.timeout, spec.part, self.metrics)
            worker.start()
            workers[name] = worker
        changes["removed"] = [name for name in self.stashes if name not in config.stashes]
        retired = [
            (self.workers[name], self.stashes[name])
            for name in self.stashes
            if name not in workers or workers[name] is not self.workers[name]
        ]
        underway = list(self.fanout.active)
        self.config = config
        self.stashes = stashes
        self.workers = workers
        self.routes = {
            route.path: [name for name in config.stashes if name in route.stashes]
            for route in config.routes
        }
        self.readers = {
            route.path: [IReader(stashes[name]) for name in route.read] for route in config.routes
        }
        self.fanout.routing = Routing(self.workers, self.routes)
        self.failQueue.retry = config.retry
        for name in changes["removed"]:
            self.startFailures.pop(name, None)

        def retire(_: object) -> Deferred[None]:
            for worker, _stash in retired:
                worker.stop()
            return Deferred.fromCoroutine(
                stopAll([(w.stash.name, s, w.timeout) for w, s in retired], self.clock)
            )

        DeferredList(underway, consumeErrors=True).addCallback(retire)
        self.log.info(
            "configuration reloaded from {source}: {summary}",
            source=str(config.source),
            summary=", ".join(f"{what}: {', '.join(names)}" for what, names in changes.items() if names),
        )
        return changes

    async def drain(self, grace: float) -> int:
        """
        Let the UOWs under way finish, for at most C{grace} seconds.

        @return: How many were still under way at the deadline; their spool
            files stay for recovery.
        """
        assert self.fanout is not None
        if self.retries is not None:
            self.retries.stop()
        if self.consumers is not None:
            self.consumers.pause()
        active = list(self.fanout.active)
        if not active:
            return 0
        # A timeout cancels what it waits on, and the UOWs must go on.
        waiting = shielded(DeferredList(active, consumeErrors=True))
        waiting.addTimeout(grace, self.clock)
        try:
            await waiting
        except (defer.TimeoutError, error.TimeoutError):
            pass
        return len(self.fanout.active)

    async def stop(self) -> None:
        """
        Stop taking work and close every stash and the state store.
        """
        self.housekeeping.stop()
        if self.retries is not None:
            self.retries.stop()
        if self.consumers is not None:
            await self.consumers.stop()
        if self.fanout is not None:
            self.fanout.stop()
        for worker in self.workers.values():
            worker.stop()
        await stopAll(
            [(name, stash, self.workers[name].timeout) for name, stash in self.stashes.items()],
            self.clock,
        )
        await self.journal.stop()

    async def drop(self, uowId: int) -> FailedUOW:
        """
        Drop a failed UOW for good, on an operator's word: record it as
        dropped (its Idempotency-Key then answers 410), then forget its fail
        queue entry and its spool file. A crash in between leaves them for
        recovery, which sees the final state and only cleans up.

        @return: The fail queue entry it had.
        @raise NotFailed: It is not in the fail queue.
        @raise BeingRetried: An attempt at it is under way.
        """
        before = await self.failQueue.fresh(uowId)
        if before is None:
            raise NotFailed(uowId)
        # Taken as for an attempt, so that no other server starts one.
        entry = await self.failQueue.markRetrying(uowId)
        if entry is None:
            raise BeingRetried(uowId)
        try:
            try:
                uow: UnitOfWork | None = await self.spool.load(uowId)
            except (CorruptSpoolFile, FileNotFoundError):
                uow = None
            await self.states.record(
                StateRecord.of(Status.dropped, entry.report, entry.route, self.clock.seconds(), uow)
            )
        except BaseException:
            await self.failQueue.put(before)  # as it was: nothing dropped
            raise
        if uow is not None:
            self.idempotency.release(uow)
        await self.failQueue.drop(uowId)
        await self.spool.delete(uowId)
        self.records.mark(uowId, Status.dropped)
        self.log.warn("UOW {uow} dropped by an operator", uow=uowId, key=entry.key)
        return before

    async def submit(self, request: UnitOfWork) -> Admission:
        """
        Spool C{request} under a new UOW id and queue it for the fanout.

        @raise apicontainer.storage.SpoolError: Nothing was spooled.
        """
        assert self.front is not None, "open() first"
        return await self.front.admit(request)
