"""
A downstream HTTP API for the http stash's tests: a resource store that can
be told to fail, hang or drop the connection.
"""

from __future__ import annotations

from typing import Any

from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET


class Downstream(Resource):
    """
    GET/PUT/POST/DELETE documents by path, in memory.

    @ivar mode: C{None} (normal), an int (answer every write with that
        status), C{"hang"} (never answer writes), C{"drop"} (close the
        connection on writes), C{"late"} (apply and answer writes after
        C{lateBy} seconds, on C{clock}) or C{"trickle"} (answer writes one
        byte every C{lateBy} seconds).
    @ivar requests: Every request, as C{(method, path, Idempotency-Key)}.
    """

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.documents: dict[bytes, tuple[bytes, bytes | None]] = {}
        self.mode: Any = None
        self.requests: list[tuple[bytes, bytes, bytes | None]] = []
        self.lateBy = 1.0
        self.clock: Any = None

    def render(self, request: Any) -> Any:
        method, path = request.method, request.path
        self.requests.append((method, path, request.getHeader(b"idempotency-key")))
        if method == b"GET":
            if path not in self.documents:
                request.setResponseCode(404)
                return b"not found"
            body, contentType = self.documents[path]
            if contentType:
                request.setHeader(b"content-type", contentType)
            return body
        if self.mode == "hang":
            return NOT_DONE_YET
        if self.mode == "drop":
            request.channel.transport.abortConnection()
            return NOT_DONE_YET
        if self.mode == "late":
            body, contentType = request.content.read(), request.getHeader(b"content-type")

            def late() -> None:
                self.documents[path] = (body, contentType)
                if not request._disconnected:
                    request.write(b"ok")
                    request.finish()

            self.clock.callLater(self.lateBy, late)
            return NOT_DONE_YET
        if self.mode == "trickle":
            request.setHeader(b"content-length", b"20")
            remaining = [20]

            def drip() -> None:
                if request._disconnected or not remaining[0]:
                    return
                request.write(b"x")
                remaining[0] -= 1
                if remaining[0]:
                    self.clock.callLater(self.lateBy, drip)
                else:
                    request.finish()

            drip()
            return NOT_DONE_YET
        if isinstance(self.mode, int):
            request.setResponseCode(self.mode)
            return b"refused"
        if method == b"DELETE":
            if self.documents.pop(path, None) is None:
                request.setResponseCode(404)
            return b""
        self.documents[path] = (request.content.read(), request.getHeader(b"content-type"))
        request.setResponseCode(200)
        return b"ok"
