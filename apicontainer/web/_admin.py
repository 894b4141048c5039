"""
The admin API, on its own endpoint: health, UOW states and the fail queue.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Awaitable, Callable

from klein import Klein
from prometheus_client import CONTENT_TYPE_LATEST
from twisted.internet.defer import DeferredList, maybeDeferred
from twisted.logger import Logger
from twisted.web.iweb import IRequest
from werkzeug.exceptions import MethodNotAllowed, NotFound

from ..config import ConfigError
from ..interfaces import IProbe
from ..pipeline import BeingRetried, Container, NotFailed
from ..uow import FAILED, Status
from ._auth import BearerTokens
from ._openapi import describe
from ._responses import errorResponse, jsonResponse

PAGE = Path(__file__).with_name("failqueue.html")


class AdminAPI:
    """
    The operator's Klein app.
    """

    app = Klein()
    log = Logger()

    def __init__(
        self,
        container: Container,
        tokens: BearerTokens | None = None,
        reload: Callable[[], Awaitable[dict[str, Any]]] | None = None,
    ) -> None:
        """
        @param reload: Reloads the configuration (C{POST /_reload}).
        """
        self._container = container
        self.tokens = tokens
        self._reload = reload

    def _unauthorized(self, request: IRequest) -> bytes | None:
        if self.tokens is None or self.tokens.accepts(request.getHeader(b"authorization")):
            return None
        return errorResponse(
            request,
            401,
            "unauthorized",
            "a valid bearer token is required",
            www_authenticate='Bearer realm="apicontainer-admin"',
        )

    @app.route("/", methods=["GET"])
    def page(self, request: IRequest) -> bytes:
        """
        The fail-queue page: a static page that calls this API (with the
        admin token the operator types in, when tokens are configured).
        """
        request.setHeader(b"content-type", b"text/html; charset=utf-8")
        request.setHeader(b"content-security-policy", b"default-src 'self' 'unsafe-inline'")
        return PAGE.read_bytes()

    @app.route("/_health", methods=["GET"])
    def health(self, request: IRequest) -> bytes:
        """
        Alive, with the counts an operator looks at first.
        """
        failQueue = self._container.failQueue
        counts = {state.value: len(failQueue.list(state)) for state in FAILED}
        alarms = [
            f"{counts[state.value]} UOW(s) {state.value}: an operator must retry or drop them"
            for state in (Status.parked, Status.stuck)
            if counts[state.value]
        ]
        unsettled = len(self._container.fanout.unsettled) if self._container.fanout else 0
        if unsettled:
            alarms.append(
                f"{unsettled} UOW(s) unsettled: their outcome could not be recorded"
                " (is the disk full?); the server re-drives them until they settle"
            )
        if not self._container.recovered:
            alarms.append("recovery has not finished")
        cluster = self._container.clusterStatus()
        if cluster is not None and not cluster["connected"]:
            alarms.append("JetStream is unreachable: writes are refused with 503 until it is back")
        for name, problem in self._container.startFailures.items():
            alarms.append(f"stash {name} failed to start: {problem}")
        return self._unauthorized(request) or jsonResponse(
            request,
            200,
            {
                "status": "attention" if alarms else "ok",
                "alarms": alarms,
                "in_flight": self._container.records.inFlight,
                "unsettled": unsettled,
                "failed": counts,
                **({"cluster": cluster} if cluster is not None else {}),
            },
        )

    @app.route("/_ready", methods=["GET"])
    async def ready(self, request: IRequest) -> bytes:
        """
        Ready to take traffic: recovery is done and every stash that can be
        probed answers within its timeout; 503 with the reasons otherwise.
        """
        refusal = self._unauthorized(request)
        if refusal:
            return refusal
        container = self._container
        reasons = [] if container.recovered else ["recovery has not finished"]
        if container.link is not None and not container.link.connected:
            reasons.append(f"JetStream is unreachable at {', '.join(container.link.settings.servers)}")
        names, probes = [], []
        for name, stash in container.stashes.items():
            if IProbe.providedBy(stash):
                names.append(name)
                probes.append(
                    maybeDeferred(stash.probe).addTimeout(container.workers[name].timeout, container.clock)
                )
        for name, (ok, result) in zip(names, await DeferredList(probes, consumeErrors=True)):
            if not ok:
                reasons.append(f"stash {name} is unreachable: {result.getErrorMessage() or result.type.__name__}")
        if reasons:
            return jsonResponse(request, 503, {"ready": False, "reasons": reasons}, retry_after="5")
        return jsonResponse(request, 200, {"ready": True, "reasons": []})

    @app.route("/_reload", methods=["POST"])
    async def reload(self, request: IRequest) -> bytes:
        """
        Load the configuration file again and switch to it between UOWs; a
        wrong one is refused (400, with the reason) and the running one stays.
        """
        refusal = self._unauthorized(request)
        if refusal:
            return refusal
        if self._reload is None:
            return errorResponse(request, 404, "no_route", "this server cannot reload")
        try:
            changes = await self._reload()
        except ConfigError as e:
            return errorResponse(request, 400, "bad_config", str(e))
        return jsonResponse(request, 200, changes)

    @app.route("/_openapi.json", methods=["GET"])
    def openapi(self, request: IRequest) -> bytes:
        """
        The OpenAPI 3.1 document of the running configuration.
        """
        refusal = self._unauthorized(request)
        if refusal:
            return refusal
        container = self._container
        return jsonResponse(
            request,
            200,
            describe(container.config, container.config.tokensFile is not None, self.tokens is not None),
        )

    @app.route("/metrics", methods=["GET"])
    def metrics(self, request: IRequest) -> bytes:
        """
        The Prometheus metrics, in the text exposition format.
        """
        refusal = self._unauthorized(request)
        if refusal:
            return refusal
        request.setHeader(b"content-type", CONTENT_TYPE_LATEST.encode("ascii"))
        return self._container.metrics.exposition()

    @app.route("/_uow/<int:uowId>", methods=["GET"])
    async def uow(self, request: IRequest, uowId: int) -> bytes:
        """
        The state of one UOW and its last per-stash report.
        """
        refusal = self._unauthorized(request)
        if refusal:
            return refusal
        assert self._container.fanout is not None
        unsettled = self._container.fanout.unsettled.get(uowId)
        if unsettled is not None:
            return jsonResponse(request, 200, {**unsettled.asJSON(), "failed": False})
        entry = self._container.failQueue.get(uowId)
        if entry is not None:
            return jsonResponse(request, 200, {**entry.asJSON(), "failed": True})
        record = self._container.records.get(uowId)
        # A recent UOW that was queued is no longer in the fail queue: its
        # final state (recorded here or by another server) says what became
        # of it.
        if record is not None and record.state is not Status.queued:
            return jsonResponse(request, 200, {**record.asJSON(), "failed": False})
        final = await self._container.states.get(uowId)
        if final is not None:
            return jsonResponse(request, 200, {**final.asJSON(), "failed": False})
        if record is not None:
            return jsonResponse(request, 200, {**record.asJSON(), "failed": False})
        return errorResponse(
            request,
            404,
            "unknown_uow",
            f"UOW {uowId} is not under way, not in the fail queue, and has no final state"
            " within the retention",
        )

    @app.route("/_failed", methods=["GET"])
    def failed(self, request: IRequest) -> bytes:
        """
        The fail queue, oldest UOW first; C{?state=} filters.
        """
        refusal = self._unauthorized(request)
        if refusal:
            return refusal
        states = request.args.get(b"state", [])
        state = None
        if states:
            try:
                state = Status(states[0].decode("ascii", "replace"))
                if state not in FAILED:
                    raise ValueError(state)
            except ValueError:
                known = ", ".join(s.value for s in FAILED)
                return errorResponse(request, 400, "bad_state", f"state is one of: {known}")
        entries = self._container.failQueue.list(state)
        return jsonResponse(request, 200, {"failed": [e.asJSON() for e in entries]})

    @app.route("/_failed/<int:uowId>/retry", methods=["POST"])
    async def retry(self, request: IRequest, uowId: int) -> bytes:
        """
        Retry a failed UOW now, whatever its schedule, parked and stuck ones
        included; answer with the outcome of that attempt.
        """
        refusal = self._unauthorized(request)
        if refusal:
            return refusal
        container = self._container
        if container.failQueue.get(uowId) is None:
            return errorResponse(request, 404, "not_failed", f"UOW {uowId} is not in the fail queue")
        assert container.retries is not None
        attempt = await container.retries.retryNow(uowId)
        if attempt is None:
            return errorResponse(request, 409, "retrying", f"UOW {uowId} is being retried already")
        self.log.warn("UOW {uow} retried by an operator", uow=uowId)
        report = await attempt
        entry = container.failQueue.get(uowId)
        body: dict[str, Any] = {
            "uow": uowId,
            "state": entry.state.value if entry else (report.outcome.value if report else "dropped"),
            "report": report.asRecord() if report else None,
        }
        if entry is not None:
            body["next_attempt_at"] = entry.nextAttemptAt
        return jsonResponse(request, 200, body)

    @app.route("/_failed/<int:uowId>", methods=["DELETE"])
    async def drop(self, request: IRequest, uowId: int) -> bytes:
        """
        Drop a failed UOW and its spool file: it will never be retried.
        """
        refusal = self._unauthorized(request)
        if refusal:
            return refusal
        try:
            entry = await self._container.drop(uowId)
        except NotFailed:
            return errorResponse(request, 404, "not_failed", f"UOW {uowId} is not in the fail queue")
        except BeingRetried:
            return errorResponse(
                request, 409, "retrying", f"UOW {uowId} is being retried; try again when it ends"
            )
        record: dict[str, Any] = {**entry.asJSON(), "state": Status.dropped.value}
        return jsonResponse(request, 200, record)

    @app.handle_errors(NotFound)
    def notFound(self, request: IRequest, failure: Any) -> bytes:
        """
        No such admin resource.
        """
        return errorResponse(request, 404, "no_route", "no admin resource at this path")

    @app.handle_errors(MethodNotAllowed)
    def methodNotAllowed(self, request: IRequest, failure: Any) -> bytes:
        """
        The resource exists but not for this method.
        """
        allow = ", ".join(sorted(failure.value.valid_methods or []))
        return errorResponse(request, 405, "method", "method not allowed here", allow=allow)

    @app.handle_errors(Exception)
    def unexpected(self, request: IRequest, failure: Any) -> bytes:
        """
        Log an unexpected error and answer 500 without a traceback.
        """
        self.log.failure("unexpected error on {path}", failure, path=request.path)
        return errorResponse(request, 500, "internal", "internal error; see the server log")
