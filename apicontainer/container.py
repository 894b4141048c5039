"""
The container: spool, front queue, fanout, stash workers and fail queue,
built from a configuration and wired together.
"""

from __future__ import annotations

from pathlib import Path

from twisted.internet.defer import DeferredList
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from .blocking import Blocking
from .config import Config, ConfigError
from .failqueue import FileFailQueue
from .fanout import Fanout
from .frontqueue import Admission, FrontQueue
from .interfaces import IReader, IStartable, IStash
from .records import UOWRecords
from .registry import stashFactory
from .spool import Spool
from .stashes import StashContext
from .uow import UnitOfWork
from .uowids import UOWIds
from .worker import StashWorker


def buildStashes(config: Config, context: StashContext) -> dict[str, IStash]:
    """
    Build every configured stash, in configuration order, and check that
    each route's C{read} names readers.

    @raise ConfigError: A stash's options are wrong, or a read component
        cannot read.
    """
    stashes: dict[str, IStash] = {}
    for name, spec in config.stashes.items():
        stash = stashFactory(spec.type)(spec, context)
        if spec.options is not None:
            spec.options.rejectUnknown()
        if not IStash.providedBy(stash):
            raise ConfigError(f"stash type {spec.type!r} built {stash!r}, which is not an IStash")
        stashes[name] = stash
    for route in config.routes:
        for name in route.read:
            if not IReader.providedBy(stashes[name]):
                assert route.section is not None
                raise route.section.error(
                    "read", f"stash {name!r} (type {config.stashes[name].type}) cannot read"
                )
    return stashes


class Container:
    """
    The pipeline of one server.

    Build it, call L{open} (blocking, at start-up), then L{start}; submit
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
    ) -> None:
        self.config = config
        self.clock = clock
        self.stashes = stashes
        dataDir = Path(config.dataDir)
        self.spool = Spool(dataDir / "spool", dataDir / "quarantine", blocking)
        self.ids = UOWIds(dataDir / "uow-ids", blocking)
        self.failQueue = FileFailQueue(dataDir / "failed", blocking, clock, config.retry)
        self.records = UOWRecords()
        self.workers = {
            name: StashWorker(stash, clock, spec.concurrency, spec.timeout)
            for (name, spec), stash in zip(config.stashes.items(), stashes.values())
        }
        self.routes = {
            route.path: [name for name in config.stashes if name in route.stashes]
            for route in config.routes
        }
        self.readers: dict[str, list[IReader]] = {
            route.path: [IReader(stashes[name]) for name in route.read] for route in config.routes
        }
        self.front: FrontQueue | None = None
        self.fanout: Fanout | None = None

    def open(self) -> None:
        """
        Create or load the spool, the UOW id record and the fail queue
        (blocking: call it before the reactor runs).
        """
        self.spool.open()
        self.ids.open()
        for path in self.failQueue.open():
            self.log.error("fail queue entry {path} is unreadable; left in place", path=str(path))
        self.front = FrontQueue(self.ids, self.spool)
        self.fanout = Fanout(
            self.front, self.workers, self.routes, self.spool, self.failQueue, self.records
        )

    async def start(self) -> None:
        """
        Start every stash, then the workers and the fanout.
        """
        assert self.fanout is not None, "open() first"
        for name, stash in self.stashes.items():
            if IStartable.providedBy(stash):
                await stash.start()
        for worker in self.workers.values():
            worker.start()
        self.fanout.start()

    async def stop(self) -> None:
        """
        Stop taking work and close every stash.
        """
        if self.fanout is not None:
            self.fanout.stop()
        for worker in self.workers.values():
            worker.stop()
        await DeferredList(
            [stash.stop() for stash in self.stashes.values() if IStartable.providedBy(stash)],
            consumeErrors=True,
        )

    async def submit(self, request: UnitOfWork) -> Admission:
        """
        Spool C{request} under a new UOW id and queue it for the fanout.

        @raise apicontainer.spool.SpoolError: Nothing was spooled.
        """
        assert self.front is not None, "open() first"
        return await self.front.admit(request)
