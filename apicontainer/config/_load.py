"""
The configuration file read into a L{Config}: every key, stash and route
checked before anything starts.
"""

from __future__ import annotations

import ipaddress
import re
from pathlib import Path

import yaml
from attrs import field, frozen
from twisted.internet.endpoints import serverFromString
from twisted.internet.testing import MemoryReactor
from werkzeug.routing import Map, Rule

from .. import storage
from ..storage import RetryPolicy
from ._registry import stashTypes
from ._section import ConfigError, Section

DEFAULT_CONFIG = Path(__file__).with_name("default.yaml")

# The backends of the spool and of the fail queue (see apicontainer.storage).
SPOOL_BACKENDS = tuple(storage.SPOOL_BACKENDS)
FAILQUEUE_BACKENDS = tuple(storage.FAILQUEUE_BACKENDS)

_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}$")


@frozen
class Limits:
    """
    What ingress accepts.
    """

    maxBodyBytes: int = 10 * 1024 * 1024
    maxInFlight: int = 1024
    requestTimeout: float = 60.0
    shutdownGrace: float = 30.0
    headerTimeout: float = 10.0
    bodyTimeout: float = 60.0
    maxHeaders: int = 100
    maxHeaderBytes: int = 16384
    maxConnections: int = 1024
    maxConnectionsPerPeer: int = 256
    minFreeBytes: int = 16 * 1024 * 1024


@frozen
class StashSpec:
    """
    One entry of C{stashes}: the parts every stash has, and its own options.
    """

    name: str
    type: str
    concurrency: int
    timeout: float
    options: Section = field(eq=False)
    part: str | None = None


@frozen
class RouteSpec:
    """
    One entry of C{routes}.
    """

    path: str
    stashes: tuple[str, ...]
    read: tuple[str, ...]
    section: Section = field(eq=False)


@frozen
class Config:
    """
    A validated configuration.
    """

    source: Path
    listen: str
    adminListen: str
    dataDir: Path
    tokensFile: Path | None
    limits: Limits
    failqueueBackend: str
    retry: RetryPolicy
    stashes: dict[str, StashSpec]
    routes: tuple[RouteSpec, ...]
    idempotencyRetention: float = 86400.0
    adminTokensFile: Path | None = None
    openToNetwork: bool = False
    spoolBackend: str = "file"
    # The cluster of the jetstream backends; None for the file backend.
    jetstream: storage.JetStreamSettings | None = None


def isLoopbackOnly(description: str) -> bool:
    """
    Whether the server endpoint C{description} can only be reached from
    this machine: a UNIX socket, or TCP (plain or TLS) on a loopback
    interface. TCP with no C{interface} listens on every interface.
    """
    endpoint = serverFromString(MemoryReactor(), description)
    interface = getattr(endpoint, "_interface", None)
    if interface is None:
        return type(endpoint).__name__ == "UNIXServerEndpoint"
    if interface == "localhost":
        return True
    try:
        return ipaddress.ip_address(interface).is_loopback
    except ValueError:
        return False


def _backend(section: Section, what: str, known: tuple[str, ...]) -> str:
    """
    The section's C{backend}: C{file} by default, else one of C{known}.
    """
    backend = section.string("backend", "file")
    if backend not in known:
        raise section.error("backend", f"unknown {what} backend {backend!r} (known: {', '.join(known)})")
    return backend


def _endpoint(section: Section, key: str, default: str) -> str:
    description = section.string(key, default)
    try:
        serverFromString(MemoryReactor(), description)
    except Exception as e:
        raise section.error(key, f"bad endpoint string {description!r}: {e}") from None
    return description


def loadConfig(path: Path, knownTypes: frozenset[str] | None = None) -> Config:
    """
    Read and validate the configuration file at C{path}.

    @param knownTypes: The stash types that may be named; by default, those of
        L{apicontainer.stashes.stashTypes}.
    @raise ConfigError: The file is missing, not YAML, or wrong.
    """
    if knownTypes is None:
        knownTypes = frozenset(stashTypes())
    source = str(path)
    try:
        text = path.read_text("utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{source}: cannot read the configuration: {e}") from None
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        if mark is not None:
            where = f"{source}:{mark.line + 1}"
        elif isinstance(getattr(e, "position", None), int):
            where = f"{source}:{text.count(chr(10), 0, e.position) + 1}"  # type: ignore[attr-defined]
        else:
            where = source
        problem = getattr(e, "problem", None) or getattr(e, "reason", None) or str(e)
        problem = " ".join(str(problem).split())
        raise ConfigError(f"{where}: not valid YAML: {problem}") from None
    if node is None:
        raise ConfigError(f"{source}:1: the configuration is empty")
    top = Section(node, "", source, 1)
    top.expect(
        "listen", "admin_listen", "data_dir", "auth", "limits", "spool", "failqueue", "idempotency",
        "stashes", "routes",
    )

    listen = _endpoint(top, "listen", "tcp:8080:interface=127.0.0.1")
    adminListen = _endpoint(top, "admin_listen", "tcp:8081:interface=127.0.0.1")
    dataDir = Path(top.string("data_dir", "./var"))
    auth = top.section("auth")
    tokensFile = auth.string("tokens_file", None)
    adminTokensFile = auth.string("admin_tokens_file", None)
    openToNetwork = auth.boolean("open_to_network", False)
    auth.rejectUnknown()
    if not openToNetwork:
        for key, description, tokens in (
            ("listen", listen, tokensFile),
            ("admin_listen", adminListen, adminTokensFile or tokensFile),
        ):
            if tokens is None and not isLoopbackOnly(description):
                raise top.error(
                    key,
                    f"{description!r} is reachable from other machines and no bearer tokens are"
                    " configured, so anyone who can reach it could write or drop work; set"
                    " auth.tokens_file, or listen on interface=127.0.0.1, or set"
                    " auth.open_to_network: true if it is open on purpose",
                )

    limitsSection = top.section("limits")
    defaults = Limits()
    limits = Limits(
        maxBodyBytes=limitsSection.integer("max_body_bytes", defaults.maxBodyBytes, minimum=1),
        maxInFlight=limitsSection.integer("max_in_flight", defaults.maxInFlight, minimum=1),
        requestTimeout=limitsSection.number("request_timeout_s", defaults.requestTimeout),
        shutdownGrace=limitsSection.number("shutdown_grace_s", defaults.shutdownGrace),
        headerTimeout=limitsSection.number("header_timeout_s", defaults.headerTimeout),
        bodyTimeout=limitsSection.number("body_timeout_s", defaults.bodyTimeout),
        maxHeaders=limitsSection.integer("max_headers", defaults.maxHeaders, minimum=1),
        maxHeaderBytes=limitsSection.integer("max_header_bytes", defaults.maxHeaderBytes, minimum=256),
        maxConnections=limitsSection.integer("max_connections", defaults.maxConnections, minimum=1),
        maxConnectionsPerPeer=limitsSection.integer(
            "max_connections_per_peer", defaults.maxConnectionsPerPeer, minimum=1
        ),
        minFreeBytes=limitsSection.integer("min_free_bytes", defaults.minFreeBytes),
    )
    limitsSection.rejectUnknown()

    idempotency = top.section("idempotency")
    retention = idempotency.number("retention_s", 86400.0)
    idempotency.rejectUnknown()

    spool = top.section("spool")
    spoolBackend = _backend(spool, "spool", SPOOL_BACKENDS)
    jetstream = _jetstream(spool, retention) if spoolBackend == "jetstream" else None
    spool.rejectUnknown()

    failqueue = top.section("failqueue")
    backend = _backend(failqueue, "fail queue", FAILQUEUE_BACKENDS)
    if backend == "jetstream" and jetstream is None:
        raise failqueue.error("backend", "jetstream needs spool.backend: jetstream (the same cluster)")
    retrySection = failqueue.section("retry")
    retryDefaults = RetryPolicy()
    retry = RetryPolicy(
        initial=retrySection.number("initial_s", retryDefaults.initial),
        factor=retrySection.number("factor", retryDefaults.factor, minimum=0.999),
        maxDelay=retrySection.number("max_delay_s", retryDefaults.maxDelay),
        maxAttempts=retrySection.integer("max_attempts", retryDefaults.maxAttempts, minimum=1),
    )
    retrySection.rejectUnknown()
    failqueue.rejectUnknown()

    stashes = _stashes(top.section("stashes"), knownTypes)
    if not stashes:
        raise top.error("stashes", "declare at least one stash")
    routes = _routes(top, stashes)
    top.rejectUnknown()
    return Config(
        source=path,
        listen=listen,
        adminListen=adminListen,
        dataDir=dataDir,
        tokensFile=Path(tokensFile) if tokensFile else None,
        adminTokensFile=Path(adminTokensFile) if adminTokensFile else None,
        limits=limits,
        failqueueBackend=backend,
        spoolBackend=spoolBackend,
        retry=retry,
        stashes=stashes,
        routes=routes,
        idempotencyRetention=retention,
        openToNetwork=openToNetwork,
        jetstream=jetstream,
    )


_STREAM = re.compile(r"^[A-Za-z0-9_-]{1,32}$")


def _jetstream(spool: Section, retention: float) -> storage.JetStreamSettings:
    """
    The C{spool} keys of the C{jetstream} backend.
    """
    servers = spool.strings("servers")
    if not servers:
        raise spool.error("servers", "name at least one NATS server, as nats://host:4222")
    for server in servers:
        if not re.match(r"^(nats|tls)://[^/\s]+$", server):
            raise spool.error("servers", f"{server!r} is not a NATS URL such as nats://host:4222")
    stream = spool.string("stream", "APICONTAINER")
    if not _STREAM.match(stream):
        raise spool.error("stream", f"{stream!r}: a stream name is 1 to 32 letters, digits, '_' and '-'")
    partitions = spool.integer("partitions", 64, minimum=1)
    if partitions > 1024:
        raise spool.error("partitions", f"{partitions} is more than 1024")
    replicas = spool.integer("replicas", 3, minimum=1)
    if replicas > 5:
        raise spool.error("replicas", f"{replicas}: JetStream keeps at most 5 replicas")
    return storage.JetStreamSettings(
        servers=tuple(servers),
        stream=stream,
        partitions=partitions,
        replicas=replicas,
        ackWait=spool.number("ack_wait_s", 10.0, minimum=1.0),
        retention=retention,
    )


def _stashes(section: Section, knownTypes: frozenset[str]) -> dict[str, StashSpec]:
    stashes = {}
    for name in section.keys():
        if not _NAME.match(name):
            raise section.error(name, "a stash name is letters, digits, '_', '-' and '.'")
        options = section.section(name)
        if name not in section or not options.keys():
            raise section.error(name, "must be a mapping with at least a 'type'")
        kind = options.string("type")
        if kind not in knownTypes:
            known = ", ".join(sorted(knownTypes))
            raise options.error("type", f"unknown stash type {kind!r} (known: {known})")
        stashes[name] = StashSpec(
            name=name,
            type=kind,
            concurrency=options.integer("concurrency", 16, minimum=1),
            timeout=options.number("timeout_s", 30.0),
            options=options,
            part=options.string("part", None),
        )
    return stashes


def _routes(top: Section, stashes: dict[str, StashSpec]) -> tuple[RouteSpec, ...]:
    routes: list[RouteSpec] = []
    rules = Map()
    for route in top.sequence("routes"):
        path = route.string("path")
        if not path.startswith("/"):
            raise route.error("path", f"must start with '/', not {path!r}")
        if path.startswith("/_"):
            raise route.error("path", "paths starting with '/_' are reserved")
        try:
            rules.add(Rule(path, endpoint=path))
            rules.bind("localhost").match("/")  # compiles every rule added so far
        except Exception as e:
            if "NotFound" not in type(e).__name__:
                raise route.error("path", f"not a valid route pattern: {e}") from None
        if any(existing.path == path for existing in routes):
            raise route.error("path", f"route {path!r} is declared twice")
        names = route.strings("stashes")
        if not names:
            raise route.error("stashes", "name at least one stash")
        read = route.strings("read", [])
        for key, listed in (("stashes", names), ("read", read)):
            for name in listed:
                if name not in stashes:
                    declared = ", ".join(stashes)
                    raise route.error(
                        key, f"names stash {name!r}, which is not declared (declared: {declared})"
                    )
        route.rejectUnknown()
        routes.append(RouteSpec(path, tuple(names), tuple(read), route))
    return tuple(routes)
