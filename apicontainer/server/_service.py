"""
The server as a Twisted service: starts the container, then listens.
"""

from __future__ import annotations

import gc
import os
import signal
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredLock, maybeDeferred
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IListeningPort
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool

from ..blocking import Blocking, inThreadPool
from ..config import ConfigError, isLoopbackOnly, loadConfig
from ..pipeline import Container, shielded
from ..stashes import StashContext
from ..web import AdminAPI, BearerTokens, Ingress, LimitedSite


def _encrypted(endpoint: object) -> bool:
    return type(endpoint).__name__.startswith("SSL")


class SerialPools:
    """
    One-thread pools, one per stash that asks for a serial runner; started
    and stopped with the service, and each released by its stash once the
    stash has stopped (a stash a reload replaced or removed).
    """

    def __init__(self, reactor: Any) -> None:
        self._reactor = reactor
        self._pools: list[ThreadPool] = []
        self._started = False

    def runner(self, name: str) -> Blocking:
        """
        A runner that runs one call at a time, in order, on its own thread;
        started at once when the pools already are (a stash built by a
        reload). Its C{release()} stops its thread.
        """
        pool = ThreadPool(minthreads=1, maxthreads=1, name=f"apicontainer-{name}")
        self._pools.append(pool)
        if self._started:
            pool.start()
        run = inThreadPool(self._reactor, pool)

        def release() -> None:
            if pool in self._pools:
                self._pools.remove(pool)
                pool.stop()

        run.release = release  # type: ignore[attr-defined]
        return run

    def __len__(self) -> int:
        return len(self._pools)

    def start(self) -> None:
        self._started = True
        for pool in self._pools:
            pool.start()

    def stop(self) -> None:
        self._started = False
        for pool in self._pools:
            pool.stop()


class ContainerService(Service):
    """
    Starts the stashes and the pipeline, then opens ingress and the admin API.

    If anything fails on the way, the reason is logged and the process exits
    with status 1.
    """

    log = Logger()

    def __init__(
        self,
        reactor: Any,
        container: Container,
        pools: SerialPools,
        tokens: BearerTokens | None,
        adminTokens: BearerTokens | None = None,
        context: StashContext | None = None,
    ) -> None:
        self._reactor = reactor
        self._container = container
        self._pools = pools
        self._tokens = tokens
        self._adminTokens = adminTokens
        self._context = context
        self._sites: list[LimitedSite] = []
        self._admin: AdminAPI | None = None
        self._ports: list[IListeningPort] = []
        self.ingress: Ingress | None = None
        self.started: Deferred[None] | None = None
        self._reloading = DeferredLock()

    def startService(self) -> None:
        super().startService()
        self._pools.start()
        self.started = Deferred.fromCoroutine(self._start())

    async def _start(self) -> None:
        config = self._container.config
        if config.jetstream is not None and config.jetstream.replicas == 1:
            self.log.warn(
                "spool.replicas: 1 keeps one copy of every UOW: losing that NATS server loses"
                " acknowledged writes; use 3 outside development"
            )
        try:
            await self._container.start()
            self.ingress = Ingress(self._container, self._reactor, self._tokens)
            self._admin = AdminAPI(self._container, self._adminTokens, self.reload)
            site = LimitedSite(self.ingress.resource(), config.limits, reactor=self._reactor)
            admin = LimitedSite(self._admin.app.resource(), config.limits, reactor=self._reactor)
            self._sites = [site, admin]
            for description, factory, tokens in (
                (config.listen, site, self._tokens),
                (config.adminListen, admin, self._adminTokens),
            ):
                endpoint = serverFromString(self._reactor, description)
                port = await endpoint.listen(factory)
                self._ports.append(port)
                self.log.info("listening on {endpoint}", endpoint=description)
                if tokens is not None and not isLoopbackOnly(description) and not _encrypted(endpoint):
                    self.log.warn(
                        "{endpoint} takes bearer tokens over plain TCP from other machines:"
                        " anyone on the path can read them; use an ssl: endpoint",
                        endpoint=description,
                    )
        except Exception as e:
            reason = str(e) or repr(e)
            self.log.critical("api-container could not start: {error}", error=reason)
            # Also where the other start errors go: twist has sent sys.stderr
            # to the log, so write to the process's own standard error.
            os.write(2, f"apicontainer: could not start: {' '.join(reason.split())}\n".encode())
            self._reactor.addSystemEventTrigger("after", "shutdown", os._exit, 1)
            self._reactor.callWhenRunning(self._reactor.stop)
            return
        if hasattr(signal, "SIGHUP"):
            signal.signal(signal.SIGHUP, self._hangup)
        # What start-up built lives as long as the process: out of the cyclic
        # collector's sight, its full collections (which paused the reactor
        # for about 50 ms each under load) scan only what came since.
        gc.collect()
        gc.freeze()
        self.log.info(
            "api-container ready: {routes} route(s), stashes {stashes}, data in {dataDir}",
            routes=len(config.routes),
            stashes=", ".join(self._container.stashes),
            dataDir=str(config.dataDir),
        )

    def _hangup(self, signum: int, frame: Any) -> None:
        def failed(reason: Any) -> None:
            # A wrong configuration is logged by reload itself.
            if not reason.check(ConfigError):
                self.log.failure("reload on SIGHUP failed", reason)

        def reload() -> None:
            self.reload().addErrback(failed)

        self._reactor.callFromThread(reload)

    def reload(self) -> Deferred[dict[str, Any]]:
        """
        Load the configuration file again and switch to it between UOWs;
        on SIGHUP and C{POST /_reload}. Reloads run one at a time, and
        cancelling the returned Deferred (a client that went away) neither
        stops nor undoes the one under way.

        @return: A Deferred that fires with what changed, or fails with a
            L{ConfigError} when the new configuration is wrong or a new
            stash cannot start: the running one stays in force, and the log
            says why.
        """
        running = self._reloading.run(lambda: Deferred.fromCoroutine(self._reload()))
        return shielded(running)

    async def _reload(self) -> dict[str, Any]:
        source = self._container.config.source
        try:
            config = loadConfig(source)
            tokens = BearerTokens.fromFile(config.tokensFile) if config.tokensFile else None
            adminTokens = BearerTokens.fromFile(config.adminTokensFile) if config.adminTokensFile else tokens
            assert self._context is not None
            changes = await self._container.reload(config, self._context)
        except ConfigError as e:
            self.log.error("reload refused, the running configuration stays: {error}", error=str(e))
            raise
        if self.ingress is not None:
            self.ingress.tokens = tokens
        if self._admin is not None:
            self._admin.tokens = adminTokens
        for site in self._sites:
            site.limits = config.limits
        return {"reloaded": str(source), **changes}

    async def _stop(self) -> None:
        """
        Stop accepting, give the UOWs under way C{limits.shutdown_grace_s} to
        finish, then close everything. What is still under way stays in the
        spool, and recovery settles it at the next start.
        """
        for port in self._ports:
            await maybeDeferred(port.stopListening)
        self._ports = []
        grace = self._container.config.limits.shutdownGrace
        if self._container.fanout is not None:
            left = await self._container.drain(grace)
            if left:
                self.log.warn(
                    "stopping with {count} UOW(s) under way after {grace}s;"
                    " recovery settles them at the next start",
                    count=left,
                    grace=grace,
                )
        await self._container.stop()
        self._pools.stop()

    def stopService(self) -> Deferred[None]:
        super().stopService()
        return Deferred.fromCoroutine(self._stop())
