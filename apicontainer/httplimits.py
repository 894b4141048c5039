"""
Limits enforced while a request streams in, before any handler runs.
"""

from __future__ import annotations

import json
from typing import Any, Callable

from twisted.web.server import Request


def rawResponse(status: int, reason: str, body: dict[str, Any], extra: str = "") -> bytes:
    """
    A complete HTTP/1.1 response that closes the connection.
    """
    payload = json.dumps(body, separators=(",", ":")).encode() + b"\n"
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

    def gotLength(self, length: int | None) -> None:
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


def limitedRequestFactory(maxBodyBytes: int) -> Callable[..., LimitedRequest]:
    """
    A C{requestFactory} for a L{twisted.web.server.Site} that enforces
    C{maxBodyBytes}.
    """
    return type("LimitedRequest", (LimitedRequest,), {"maxBodyBytes": maxBodyBytes})
