"""
Ingress: the HTTP surface clients write to and read from.
"""

from __future__ import annotations

import io
from typing import Any

from klein import Klein
from twisted.internet import defer, error
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest
from twisted.web.resource import IResource, Resource
from werkzeug.exceptions import NotFound
from werkzeug.routing import Map, Rule

from ..config import Limits
from ..pipeline import Admission, BadIdempotencyKey, Container, Deadlines, KeyConflict, validateKey
from ..storage import SpoolError, SpoolFull, SpoolTooLarge, SpoolUnavailable
from ..uow import MUTATING_METHODS, Report, SpooledBody, Status, UnitOfWork
from ._auth import BearerTokens
from ._keys import BadKey, keyFromPath
from ._responses import errorResponse, jsonResponse

READING_METHODS = frozenset({"GET", "HEAD"})
_ALLOW_MUTATIONS = "DELETE, PATCH, POST, PUT"
_ALLOW_ALL = "DELETE, GET, HEAD, PATCH, POST, PUT"


class Ingress:
    """
    The client-facing Klein app: mutations are spooled and fanned out, reads
    answered from the route's read components.

    Everything that can refuse a request (route, method, auth, size, load)
    is checked before anything is written to disk.
    """

    app = Klein()
    log = Logger()

    def __init__(
        self,
        container: Container,
        clock: IReactorTime,
        tokens: BearerTokens | None = None,
    ) -> None:
        """
        The routes and limits are the container's configuration in force,
        read for each request, so that a reload applies to the next one.
        """
        self._container = container
        self._clock = clock
        self._deadlines = Deadlines(clock)
        self.tokens = tokens
        self._rulesFor: object = None
        self._rules: Any = None
        self.inFlight = 0

    @property
    def _limits(self) -> Limits:
        return self._container.config.limits

    def _match(self, key: str) -> str:
        routes = self._container.routes
        if self._rulesFor is not routes:
            self._rules = Map([Rule(path, endpoint=path) for path in routes]).bind("")
            self._rulesFor = routes
        route, _ = self._rules.match(key)
        return route  # type: ignore[no-any-return]

    def resource(self) -> IResource:
        """
        The ingress as a web resource: the key check, then the Klein app.
        """
        return _KeyCheck(self.app.resource())

    @app.route("/", branch=True)
    async def handle(self, request: IRequest) -> bytes:
        """
        Route the request by its key, then write or read.
        """
        key: str = request.resourceKey  # type: ignore[attr-defined]
        try:
            route = self._match(key)
        except NotFound:
            return errorResponse(request, 404, "no_route", f"no route matches {key}")
        method = request.method.decode("ascii", "replace").upper()
        readable = bool(self._container.readers[route])
        if method not in MUTATING_METHODS and not (readable and method in READING_METHODS):
            allow = _ALLOW_ALL if readable else _ALLOW_MUTATIONS
            return errorResponse(
                request, 405, "method", f"{method} is not allowed on {route}", allow=allow
            )
        if self.tokens is not None and not self.tokens.accepts(
            request.getHeader(b"authorization")
        ):
            return errorResponse(
                request,
                401,
                "unauthorized",
                "a valid bearer token is required",
                www_authenticate='Bearer realm="apicontainer"',
            )
        if method in READING_METHODS:
            return await self._read(request, route, key)
        return await self._mutate(request, method, route, key)

    async def _read(self, request: IRequest, route: str, key: str) -> bytes:
        for reader in self._container.readers[route]:
            try:
                document = await reader.read(key)
            except Exception:
                self.log.failure("read component {stash} failed on {key}", stash=reader.name, key=key)
                return errorResponse(
                    request, 503, "unavailable", f"read component {reader.name} failed", retry_after="1"
                )
            if document is not None:
                request.setHeader(
                    b"content-type",
                    (document.contentType or "application/octet-stream").encode("latin-1"),
                )
                request.setHeader(b"x-apicontainer-uow", b"%d" % (document.uow,))
                return document.body
        return errorResponse(request, 404, "not_found", f"nothing is stored under {key}")

    async def _mutate(self, request: IRequest, method: str, route: str, key: str) -> bytes:
        # A large body stays in the file Twisted received it into, and is
        # streamed from there to the spool. The file is then ours: Twisted
        # closes the request's content when the client goes away, perhaps
        # before the spool has read it.
        body = SpooledBody.ofFile(request.content) if request.content is not None else b""
        if isinstance(body, SpooledBody):
            request.content = io.BytesIO()
        size = SpooledBody.lengthOf(body)
        if size > self._limits.maxBodyBytes:
            return errorResponse(
                request,
                413,
                "too_large",
                f"the body exceeds limits.max_body_bytes ({self._limits.maxBodyBytes} bytes)",
            )
        if self.inFlight >= self._limits.maxInFlight:
            return errorResponse(
                request,
                503,
                "busy",
                f"limits.max_in_flight ({self._limits.maxInFlight}) requests are under way",
                retry_after="1",
            )
        contentType = request.getHeader(b"content-type")
        rawKey = request.getHeader(b"idempotency-key")
        idempotencyKey = None
        if rawKey is not None:
            try:
                idempotencyKey = validateKey(rawKey)
            except BadIdempotencyKey as e:
                return errorResponse(request, 400, "bad_idempotency_key", str(e))
        template = UnitOfWork(
            id=0,
            method=method,
            key=key,
            route=route,
            body=body,
            contentType=contentType.decode("latin-1") if contentType else None,
            receivedAt=self._clock.seconds(),
            idempotencyKey=idempotencyKey,
        )
        self._container.metrics.requestBytes.observe(size)
        self.inFlight += 1
        try:
            if idempotencyKey is not None:
                try:
                    replay = await self._container.idempotency.claim(
                        idempotencyKey, template.payloadHash()
                    )
                except KeyConflict as e:
                    return errorResponse(request, e.status, "idempotency_key", str(e))
                except SpoolUnavailable as e:
                    return errorResponse(request, 503, "spool_unavailable", str(e), retry_after="2")
                if replay is not None:
                    return self._answer(request, replay.report, replay.location, replayed=True)
            # After the key's own answer, which writes nothing: a resend on
            # a full disk is answered as its key says, not refused.
            refusal = self._lacksRoom(request, route, size)
            if refusal is not None:
                if idempotencyKey is not None:
                    self._container.idempotency.abandon(idempotencyKey)
                return refusal
            return await self._submit(request, template)
        finally:
            self.inFlight -= 1

    def _lacksRoom(self, request: IRequest, route: str, size: int) -> bytes | None:
        """
        The 503 for a write of C{size} bytes on C{route} that would leave a
        disk it lands on below C{limits.min_free_bytes}, or L{None}.
        """
        full = self._container.lacksRoom(route, size, self._limits.minFreeBytes)
        if full is None:
            return None
        self.log.warn(
            "disk full: a {size}-byte write on {route} would leave less than"
            " limits.min_free_bytes ({reserve}) free on the disk of {path}",
            size=size,
            route=route,
            reserve=self._limits.minFreeBytes,
            path=str(full),
        )
        return errorResponse(
            request,
            503,
            "disk_full",
            f"less than limits.min_free_bytes ({self._limits.minFreeBytes}) would be left"
            " on the server's disk after this write",
            retry_after="5",
        )

    async def _submit(self, request: IRequest, template: UnitOfWork) -> bytes:
        # Klein cancels the handler when the client goes away. Spooling must
        # not be cut short by that: a file written but never queued would
        # wait for the next restart's recovery. So the handler waits on a
        # shield that a cancellation fails without touching the admission.
        admitting = Deferred.fromCoroutine(self._container.submit(template))
        idempotencyKey = template.idempotencyKey
        if idempotencyKey is not None:

            def abandon(failure: Failure) -> Failure:
                failure.trap(SpoolError, KeyConflict)
                self._container.idempotency.abandon(idempotencyKey)
                return failure

            admitting.addErrback(abandon)
        shield: Deferred[Admission] = Deferred()
        admitting.chainDeferred(shield)
        try:
            admission = await shield
        except KeyConflict as e:
            return errorResponse(request, e.status, "idempotency_key", str(e))
        except SpoolError as e:
            if isinstance(e, SpoolFull):
                return errorResponse(request, 503, "disk_full", str(e), retry_after="5")
            if isinstance(e, SpoolUnavailable):
                return errorResponse(request, 503, "spool_unavailable", str(e), retry_after="2")
            if isinstance(e, SpoolTooLarge):
                return errorResponse(request, 413, "too_large", str(e))
            self.log.error("spool write failed: {error}", error=str(e))
            return errorResponse(request, 500, "spool_failed", str(e))
        uowId = admission.uow.id
        location = f"/_uow/{uowId}"
        done = admission.done
        self._deadlines.watch(done, self._limits.requestTimeout)
        try:
            report = await done
        except (defer.TimeoutError, error.TimeoutError):
            # On a shared spool the UOW is in the replicated stream, and any
            # instance finishes it: 202. The file spool keeps its 504.
            return jsonResponse(
                request,
                202 if self._container.link is not None else 504,
                {
                    "uow": uowId,
                    "outcome": "pending",
                    "message": "still under way after limits.request_timeout_s; see Location",
                },
                location=location,
            )
        except Exception:
            return jsonResponse(
                request,
                500,
                {"uow": uowId, "outcome": "pending", "message": "internal error; the UOW stays spooled"},
                location=location,
            )
        return self._answer(
            request, report, location if report.outcome is Status.queued else None
        )

    def _answer(
        self, request: IRequest, report: Report, location: str | None, replayed: bool = False
    ) -> bytes:
        headers: dict[str, str] = {}
        if location is not None:
            headers["location"] = location
        if replayed:
            headers["idempotent_replayed"] = "true"
        return jsonResponse(request, report.status, report.asJSON(forClient=True), **headers)

    @app.handle_errors(Exception)
    def unexpected(self, request: IRequest, failure: Any) -> bytes:
        """
        Log an unexpected error and answer 500 without a traceback.
        """
        self.log.failure("unexpected error on {path}", failure, path=request.path)
        return errorResponse(request, 500, "internal", "internal error; see the server log")


class _KeyCheck(Resource):
    """
    Turns the request path into the resource key before the Klein app sees
    the request, so that every bad path (not UTF-8 once decoded included)
    gets the same JSON 400, and stores it as C{request.resourceKey}.
    """

    isLeaf = True

    def __init__(self, app: IResource) -> None:
        super().__init__()
        self._app = app

    def render(self, request: IRequest) -> Any:
        try:
            request.resourceKey = keyFromPath(request.path)  # type: ignore[attr-defined]
        except BadKey as e:
            return errorResponse(request, 400, "bad_key", str(e))
        return self._app.render(request)
