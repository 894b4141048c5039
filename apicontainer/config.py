"""
The YAML configuration: loaded, validated, and every error tied to its line.

A wrong configuration stops the start with one line, for example::

    config.yaml:12: stashes.files.type: unknown stash type 'filesytem'
    (known: filesystem, http, postgres, redis, sqlite)
"""

from __future__ import annotations

import difflib
import ipaddress
import re
from pathlib import Path
from typing import Any, Iterator

import yaml
from attrs import field, frozen
from twisted.internet.endpoints import serverFromString
from twisted.internet.testing import MemoryReactor
from werkzeug.routing import Map, Rule

from .failqueue import RetryPolicy

DEFAULT_CONFIG = Path(__file__).with_name("default.yaml")

# The backends of the spool and of the fail queue: C{file} keeps them in
# the data directory (L{apicontainer.spool.Spool},
# L{apicontainer.failqueue.FileFailQueue}).
SPOOL_BACKENDS = ("file",)
FAILQUEUE_BACKENDS = ("file",)

_REQUIRED: Any = object()
_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}$")


# What str.splitlines breaks a line at.
_LINE_BREAKS = re.compile("[\n\r\v\f\x1c\x1d\x1e\x85\u2028\u2029]")


class ConfigError(Exception):
    """
    The configuration is wrong; the message names the file, line, key and
    problem, on one line: a line break in it (from a value, or from the text
    of an error that a library raised about one) is written as its escape.
    """

    def __init__(self, message: str) -> None:
        super().__init__(_LINE_BREAKS.sub(lambda m: repr(m[0])[1:-1], message))


class Section:
    """
    One YAML mapping of the configuration, read key by key.

    Each accessor checks the value's type and range and raises a
    L{ConfigError} that names the key's full path and line. Stash types read
    their own options through one of these, so that their errors read the same.
    """

    def __init__(self, node: yaml.Node | None, path: str, source: str, line: int) -> None:
        self.path = path
        self.source = source
        self.line = line
        self._nodes: dict[str, tuple[yaml.Node, yaml.Node]] = {}
        self._used: set[str] = set()
        if node is None or (isinstance(node, yaml.ScalarNode) and node.tag.endswith(":null")):
            return
        if not isinstance(node, yaml.MappingNode):
            raise self._fail(node, path, "must be a mapping of keys to values")
        for keyNode, valueNode in node.value:
            key = _construct(keyNode)
            if not isinstance(key, str):
                raise self._fail(keyNode, path, f"key {key!r} must be a string")
            if key in self._nodes:
                raise self._fail(keyNode, self._join(key), "appears twice")
            self._nodes[key] = (keyNode, valueNode)

    def _join(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key

    def _fail(self, node: yaml.Node, path: str, problem: str) -> ConfigError:
        return ConfigError(f"{self.source}:{node.start_mark.line + 1}: {path}: {problem}")

    def error(self, key: str, problem: str) -> ConfigError:
        """
        An error about C{key}, placed on its line (or on the section's when
        the key is missing).
        """
        if key in self._nodes:
            return self._fail(self._nodes[key][1], self._join(key), problem)
        return ConfigError(f"{self.source}:{self.line}: {self._join(key)}: {problem}")

    def _unknown(self, key: str, hint: str) -> ConfigError:
        return self._fail(self._nodes[key][0], self._join(key), f"unknown key ({hint})")

    def __contains__(self, key: str) -> bool:
        return key in self._nodes

    def values(self) -> dict[str, Any]:
        """
        Every key and its value, as YAML gives them (nothing is checked).
        """
        return {key: _construct(value) for key, (_, value) in self._nodes.items()}

    def keys(self) -> list[str]:
        """
        The keys, in file order.
        """
        return list(self._nodes)

    def _take(self, key: str, default: Any) -> Any:
        self._used.add(key)
        if key not in self._nodes:
            if default is _REQUIRED:
                self._rejectMisspelling(key)
                raise self.error(key, "is required")
            return default
        return _construct(self._nodes[key][1])

    def string(self, key: str, default: Any = _REQUIRED) -> Any:
        """
        A non-empty string (or C{default}, which may be L{None}, when absent
        or null).
        """
        value = self._take(key, default)
        if value is None and default is not _REQUIRED:
            return default
        if not isinstance(value, str) or not value:
            raise self.error(key, f"must be a non-empty string, not {value!r}")
        return value

    def integer(self, key: str, default: Any = _REQUIRED, minimum: int = 0) -> int:
        """
        A whole number no smaller than C{minimum}.
        """
        value = self._take(key, default)
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise self.error(key, f"must be a whole number >= {minimum}, not {value!r}")
        return value

    def boolean(self, key: str, default: Any = _REQUIRED) -> bool:
        """
        C{true} or C{false}.
        """
        value = self._take(key, default)
        if not isinstance(value, bool):
            raise self.error(key, f"must be true or false, not {value!r}")
        return value

    def number(self, key: str, default: Any = _REQUIRED, minimum: float = 0.0) -> float:
        """
        A number greater than C{minimum}.
        """
        value = self._take(key, default)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > minimum:
            raise self.error(key, f"must be a number > {minimum:g}, not {value!r}")
        return float(value)

    def strings(self, key: str, default: Any = _REQUIRED) -> list[str]:
        """
        A list of non-empty strings, without repeats.
        """
        value = self._take(key, default)
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            raise self.error(key, f"must be a list of names, not {value!r}")
        repeated = sorted({v for v in value if value.count(v) > 1})
        if repeated:
            raise self.error(key, f"names {', '.join(repeated)} more than once")
        return value

    def section(self, key: str) -> Section:
        """
        The nested mapping under C{key}; an empty one when absent or null.
        """
        self._used.add(key)
        if key not in self._nodes:
            return Section(None, self._join(key), self.source, self.line)
        keyNode, valueNode = self._nodes[key]
        return Section(valueNode, self._join(key), self.source, keyNode.start_mark.line + 1)

    def sequence(self, key: str) -> Iterator[Section]:
        """
        The mappings of the list under C{key}, each as a section.
        """
        self._used.add(key)
        if key not in self._nodes:
            raise self.error(key, "is required")
        node = self._nodes[key][1]
        if not isinstance(node, yaml.SequenceNode) or not node.value:
            raise self.error(key, "must be a non-empty list")
        for index, item in enumerate(node.value):
            yield Section(item, f"{self._join(key)}[{index}]", self.source, item.start_mark.line + 1)

    def _rejectMisspelling(self, key: str) -> None:
        """
        Before saying that C{key} is missing, fail on a key that no accessor
        asked for and that looks like it (C{rootes} for C{routes}).
        """
        unknown = [k for k in self._nodes if k not in self._used]
        for near in difflib.get_close_matches(key, unknown, n=1, cutoff=0.6):
            raise self._unknown(near, f"did you mean {key!r}?")

    def expect(self, *keys: str) -> None:
        """
        Fail on the first key that is not one of C{keys}, before reading
        any: for a section whose keys are all known up front.
        """
        for key in self._nodes:
            if key not in keys:
                near = difflib.get_close_matches(key, keys, n=1, cutoff=0.6)
                hint = f"did you mean {near[0]!r}?" if near else f"known here: {', '.join(sorted(keys))}"
                raise self._unknown(key, hint)

    def rejectUnknown(self) -> None:
        """
        Fail on the first key that no accessor asked for: most often a typo.
        """
        for key in self._nodes:
            if key not in self._used:
                known = ", ".join(sorted(self._used)) or "none"
                raise self._unknown(key, f"known here: {known}")


def _construct(node: yaml.Node) -> Any:
    return yaml.SafeLoader("").construct_object(node, deep=True)


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
        L{apicontainer.registry}.
    @raise ConfigError: The file is missing, not YAML, or wrong.
    """
    if knownTypes is None:
        from .registry import stashTypes

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

    spool = top.section("spool")
    spoolBackend = _backend(spool, "spool", SPOOL_BACKENDS)
    spool.rejectUnknown()

    failqueue = top.section("failqueue")
    backend = _backend(failqueue, "fail queue", FAILQUEUE_BACKENDS)
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

    idempotency = top.section("idempotency")
    retention = idempotency.number("retention_s", 86400.0)
    idempotency.rejectUnknown()

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
