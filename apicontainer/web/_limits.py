"""
Limits enforced while a request streams in, before any handler runs: body
size, header and body deadlines, header count and size, and connections in
total and per peer.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.protocol import Protocol
from twisted.web.http import HTTPChannel
from twisted.web.server import Request, Site

from .._compactjson import compact


def rawResponse(status: int, reason: str, body: dict[str, Any], extra: str = "") -> bytes:
    """
    A complete HTTP/1.1 response that closes the connection.
    """
    payload = compact(body).encode() + b"\n"
    return (
        f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(payload)}\r\nConnection: close\r\n{extra}\r\n"
    ).encode("latin-1") + payload


class LimitedRequest(Request):
    """
    A request whose body may not exceed C{maxBodyBytes}.

    A declared C{Content-Length} over the limit is answered with 413 as soon
    as the headers are in; a chunked body is cut off with 413 the moment it
    passes the limit. Either way the connection is closed and the body is
    never buffered whole. Form bodies are not parsed: the body is passed on
    as it came.
    """

    maxBodyBytes = 10 * 1024 * 1024
    _tooLarge = False
    _received = 0

    def __init__(self, channel: Any, *args: Any, **kwargs: Any) -> None:
        kwargs["parsePOSTFormSubmission"] = False
        super().__init__(channel, *args, **kwargs)

    def _limit(self) -> int:
        site = getattr(self.channel, "site", None)
        limits = getattr(site, "limits", None)
        return limits.maxBodyBytes if limits is not None else self.maxBodyBytes

    def gotLength(self, length: int | None) -> None:
        self.maxBodyBytes = self._limit()
        if length is not None and length > self.maxBodyBytes:
            self._refuse()
            return
        super().gotLength(length)

    def handleContentChunk(self, data: bytes) -> None:
        if self._tooLarge:
            return
        self._received += len(data)
        if self._received > self.maxBodyBytes:
            self._refuse()
            return
        super().handleContentChunk(data)

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        if self._tooLarge:
            return
        super().requestReceived(command, path, version)

    def _refuse(self) -> None:
        self._tooLarge = True
        # No "100 Continue" must follow the refusal.
        self.requestHeaders.removeHeader(b"expect")
        transport = self.channel.transport
        assert transport is not None
        transport.write(
            rawResponse(
                413,
                "Content Too Large",
                {
                    "error": "too_large",
                    "message": f"the body exceeds limits.max_body_bytes ({self.maxBodyBytes} bytes)",
                },
            )
        )
        self.channel.loseConnection()


class LimitedChannel(HTTPChannel):
    """
    An HTTP channel that gives each request a deadline for its headers and
    one for its body: a client that sends them too slowly (slowloris) gets a
    408 and is disconnected, and holds no resources past the deadline.
    Header count and size are capped by C{maxHeaders} and
    C{totalHeadersSize}.
    """

    headerTimeout = 10.0
    bodyTimeout = 60.0
    # When the request under way must have its headers, or its body: None
    # between requests. The timer is never later than that, but may be
    # sooner: re-arming it for each request of a keep-alive connection
    # would cost the reactor a timer pushed onto its heap and a
    # cancellation, twice a request; a timer that finds the deadline not yet
    # reached sets itself again for it.
    _due: float | None = None
    _dueWhat = ""
    _dueSeconds = 0.0
    _deadline: IDelayedCall | None = None
    # Whose time the deadlines are in: the site's reactor (LimitedSite sets
    # it), or the global one for a channel made without a site.
    clock: IReactorTime | None = None
    _inRequest = False
    _host: Any = None

    def getHost(self) -> Any:
        # A connection's local address does not change: one getsockname()
        # per connection rather than one per request.
        if self._host is None:
            self._host = super().getHost()
        return self._host

    def dataReceived(self, data: bytes) -> None:
        if not self._inRequest and data.strip(b"\r\n"):
            self._inRequest = True
            self._arm(self.headerTimeout, "headers")
        super().dataReceived(data)

    def allHeadersReceived(self) -> None:
        self._arm(self.bodyTimeout, "body")
        super().allHeadersReceived()

    def allContentReceived(self) -> None:
        self._due = None
        self._inRequest = False
        super().allContentReceived()

    def connectionLost(self, reason: Any = None) -> None:
        if self._deadline is not None and self._deadline.active():
            self._deadline.cancel()
        self._deadline = None
        site = getattr(self, "site", None)
        if isinstance(site, LimitedSite):
            site.released(self)
        super().connectionLost(reason)

    def _seconds(self) -> float:
        if self.clock is None:
            from twisted.internet import reactor

            self.clock = reactor  # type: ignore[assignment]
        return self.clock.seconds()  # type: ignore[union-attr]

    def _arm(self, seconds: float, what: str) -> None:
        due = self._seconds() + seconds
        self._due, self._dueWhat, self._dueSeconds = due, what, seconds
        deadline = self._deadline
        if deadline is not None and deadline.active():
            if deadline.getTime() <= due:
                return
            deadline.cancel()
        self._deadline = self.callLater(seconds, self._check)

    def _check(self) -> None:
        self._deadline = None
        if self._due is None or self.transport is None:
            return
        left = self._due - self._seconds()
        if left > 0:
            self._deadline = self.callLater(left, self._check)
            return
        self._due = None
        self._expired(self._dueWhat, self._dueSeconds)

    def _expired(self, what: str, seconds: float) -> None:
        transport = self.transport
        assert transport is not None  # _check saw to it
        transport.write(
            rawResponse(
                408,
                "Request Timeout",
                {"error": "timeout", "message": f"the request {what} took longer than {seconds:g}s"},
            )
        )
        transport.loseConnection()


class _Refusal(Protocol):
    """
    Answers 503 and hangs up: the connection cap is reached.
    """

    def __init__(self, message: str) -> None:
        self._message = message

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.write(
            rawResponse(503, "Service Unavailable", {"error": "busy", "message": self._message}, "Retry-After: 1\r\n")
        )
        self.transport.loseConnection()


class LimitedSite(Site):
    """
    A site that caps connections, in total and per peer address, and whose
    channels are L{LimitedChannel}s.
    """

    protocol = LimitedChannel  # type: ignore[assignment]

    def __init__(self, resource: Any, limits: Any, **kwargs: Any) -> None:
        """
        @param limits: A L{apicontainer.config.Limits}.
        """
        super().__init__(resource, requestFactory=LimitedRequest, **kwargs)
        self.displayTracebacks = False
        self.limits = limits
        self._open: dict[str, int] = {}
        self._total = 0

    def buildProtocol(self, addr: Any) -> Any:
        """
        A channel with the limits in force now (a reload changes them for
        the connections that follow), or a refusal past the connection caps.
        """
        limits = self.limits
        peer = getattr(addr, "host", str(addr))
        if self._total >= limits.maxConnections:
            return _Refusal(f"limits.max_connections ({limits.maxConnections}) connections are open")
        if self._open.get(peer, 0) >= limits.maxConnectionsPerPeer:
            return _Refusal(
                f"limits.max_connections_per_peer ({limits.maxConnectionsPerPeer}) connections are open from {peer}"
            )
        channel = super().buildProtocol(addr)
        if channel is not None:
            channel.clock = self.reactor
            channel.headerTimeout = limits.headerTimeout
            channel.bodyTimeout = limits.bodyTimeout
            channel.maxHeaders = limits.maxHeaders
            channel.totalHeadersSize = limits.maxHeaderBytes
            self._total += 1
            self._open[peer] = self._open.get(peer, 0) + 1
            channel._peerKey = peer
        return channel

    def released(self, channel: Any) -> None:
        """
        A channel built here closed.
        """
        peer = getattr(channel, "_peerKey", None)
        if peer is None:
            return
        channel._peerKey = None
        self._total -= 1
        self._open[peer] -= 1
        if not self._open[peer]:
            del self._open[peer]
