"""
C{twist apicontainer}: the server's command line and service.
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
import sys
from pathlib import Path
from typing import Any

from twisted.application.service import IService, MultiService
from twisted.internet.interfaces import IReactorProcess
from twisted.python import usage

from ..blocking import inThreadPool
from ..config import DEFAULT_CONFIG, ConfigError, loadConfig
from ..pipeline import Container, buildStashes
from ..stashes import StashContext
from ..web import BearerTokens
from ._preflight import dataDirProblem
from ._service import ContainerService, SerialPools

EX_CONFIG = 78


class Options(usage.Options):
    """
    The options of C{twist apicontainer}.
    """

    synopsis = "[--config FILE]"
    longdesc = (
        "Accept HTTP writes and deliver each one to every configured store, all or "
        "nothing. Without --config, runs the embedded default configuration "
        "(SQLite + filesystem, data under ./var)."
    )
    optParameters = [
        ["config", "c", None, f"The YAML configuration file [default: {DEFAULT_CONFIG}]"],
    ]


def _refuse(message: str) -> None:
    sys.stderr.write(f"apicontainer: {message}\n")
    raise SystemExit(EX_CONFIG)


_M_ARENA_MAX = -8  # glibc's mallopt parameter


def limitMallocArenas(arenas: int = 2) -> bool:
    """
    Cap glibc's malloc arenas before the server starts its threads, unless
    the operator set C{MALLOC_ARENA_MAX}: with an arena per thread (up to
    eight per core), memory freed by one thread pool is not reused by the
    others, and RSS creeps up under sustained load.

    @return: Whether the cap was set (not on other C libraries).
    """
    if "MALLOC_ARENA_MAX" in os.environ:
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(_M_ARENA_MAX, arenas))


def sharedSpoolProblem(config: Any, reactor: Any) -> str | None:
    """
    Why the server cannot run C{config}'s shared spool on C{reactor}: the
    NATS client is asyncio, so the reactor must be Twisted's asyncio one,
    and the client must be installed.
    """
    if config.jetstream is None:
        return None
    if importlib.util.find_spec("nats") is None:
        return "spool.backend: jetstream needs the NATS client: pip install 'apicontainer[jetstream]'"
    from twisted.internet.asyncioreactor import AsyncioSelectorReactor

    if not isinstance(reactor, AsyncioSelectorReactor):
        return (
            f"spool.backend: jetstream needs the asyncio reactor: run"
            f" twist --reactor=asyncio apicontainer --config {config.source}"
        )
    return None


def makeService(options: Options) -> IService:
    """
    Load and check the configuration, open the data directory and build the
    service. A wrong configuration ends the process here with one line on
    standard error and exit status 78.
    """
    from twisted.internet import reactor as _reactor

    reactor: Any = _reactor
    limitMallocArenas()

    path = Path(options["config"]) if options["config"] else DEFAULT_CONFIG
    try:
        config = loadConfig(path)
        problem = sharedSpoolProblem(config, reactor)
        if problem:
            _refuse(problem)
        tokens = BearerTokens.fromFile(config.tokensFile) if config.tokensFile else None
        adminTokens = (
            BearerTokens.fromFile(config.adminTokensFile) if config.adminTokensFile else tokens
        )
        pools = SerialPools(reactor)
        context = StashContext(
            clock=reactor,
            dataDir=config.dataDir,
            blocking=inThreadPool(reactor, reactor.getThreadPool()),
            serial=pools.runner,
            reactor=reactor,
        )
        stashes = buildStashes(config, context)
    except ConfigError as e:
        _refuse(str(e))
    problem = dataDirProblem(config)
    if problem:
        _refuse(problem)
    processes = reactor if IReactorProcess.providedBy(reactor) else None
    container = Container(
        config, stashes, reactor, context.blocking, serial=pools.runner("state"), processes=processes, turns=reactor
    )
    try:
        container.open()
    except (OSError, ValueError) as e:
        _refuse(f"cannot open the data directory {config.dataDir}: {e}")
    root = MultiService()
    ContainerService(reactor, container, pools, tokens, adminTokens, context).setServiceParent(root)
    return root
