"""
L{ContainerHarness}: a whole pipeline on a fake clock, reached through
L{StubTreq}.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from attrs import define
from treq.testing import StubTreq
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock

from ..blocking import inline
from ..config import Config, Limits, RouteSpec, StashSpec
from ..interfaces import IReader, IStash
from ..pipeline import Container
from ..storage import RetryPolicy
from ..web import AdminAPI, BearerTokens, Ingress


@define
class HarnessResponse:
    """
    A response received through the harness, read whole.
    """

    code: int
    headers: dict[str, list[str]]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)

    def header(self, name: str) -> str | None:
        values = self.headers.get(name.lower())
        return values[0] if values else None


class ContainerHarness:
    """
    A whole container on a fake clock: real spool and fail queue files in
    C{dataDir}, blocking calls run inline, the given stashes, and ingress and
    the admin API reached through L{StubTreq}.

    @ivar clock: The L{Clock} every timeout runs on; C{advance} it.
    @ivar container: The L{Container}.
    """

    def __init__(
        self,
        dataDir: str | Path,
        stashes: Sequence[IStash],
        routes: Iterable[tuple[str, Sequence[str] | None, Sequence[str] | None]] = (
            ("/items/<id>", None, None),
        ),
        limits: Limits = Limits(),
        retry: RetryPolicy = RetryPolicy(),
        timeout: float = 30.0,
        concurrency: int = 16,
        tokens: BearerTokens | None = None,
        uniform: Callable[[], float] = lambda: 1.0,
        batches: bool = False,
    ) -> None:
        """
        @param uniform: The random source of retry jitter; by default none is
            taken off, so retries come exactly on the policy's schedule.
        @param batches: Settle the requests sent between two moves of the
            clock as one batch, as the server does those that arrive in one
            turn of its reactor (then C{clock.advance(0)} lets them go); by
            default each request goes on its own at once.
        """
        self.clock = Clock()
        names = [stash.name for stash in stashes]
        config = Config(
            source=Path("<harness>"),
            listen="tcp:0",
            adminListen="tcp:0",
            dataDir=Path(dataDir),
            tokensFile=None,
            limits=limits,
            failqueueBackend="file",
            retry=retry,
            stashes={
                name: StashSpec(name, "memory", concurrency, timeout, None)  # type: ignore[arg-type]
                for name in names
            },
            routes=tuple(
                RouteSpec(
                    path,
                    tuple(names if using is None else using),
                    tuple(
                        [s.name for s in stashes if IReader.providedBy(s)] if read is None else read
                    ),
                    None,  # type: ignore[arg-type]
                )
                for path, using, read in routes
            ),
        )
        self.container = Container(
            config,
            dict(zip(names, stashes)),
            self.clock,
            inline,
            uniform=uniform,
            turns=self.clock if batches else None,
        )
        self.container.open()
        # Fires once the stashes are started and recovery is done; with
        # in-memory stashes at once, unless a stash hangs during recovery
        # (then advance the clock past its timeout).
        self.started = Deferred.fromCoroutine(self.container.start())
        self.ingress = Ingress(self.container, self.clock, tokens)
        self._client = StubTreq(self.ingress.resource())
        self._admin = StubTreq(AdminAPI(self.container, tokens).app.resource())

    def send(
        self, method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None
    ) -> Deferred[HarnessResponse]:
        """
        Send a request to ingress.

        @return: A Deferred that fires with the L{HarnessResponse} once the
            server answers; call L{flush} (or advance the clock) to get there.
        """
        return self._send(self._client, method, path, body, headers)

    def sendAdmin(self, method: str, path: str) -> Deferred[HarnessResponse]:
        """
        Send a request to the admin API.
        """
        return self._send(self._admin, method, path, b"", None)

    def _send(
        self,
        client: StubTreq,
        method: str,
        path: str,
        body: bytes,
        headers: dict[str, str] | None,
    ) -> Deferred[HarnessResponse]:
        async def exchange() -> HarnessResponse:
            response = await client.request(  # type: ignore[attr-defined]
                method, "http://apicontainer.test" + path, data=body or None, headers=headers
            )
            content = await response.content()
            found = {
                k.decode().lower(): [v.decode("latin-1") for v in vs]
                for k, vs in response.headers.getAllRawHeaders()
            }
            return HarnessResponse(response.code, found, content)

        received = Deferred.fromCoroutine(exchange())
        self.flush()
        return received

    def flush(self) -> None:
        """
        Deliver whatever the server has answered so far.
        """
        self._client.flush()
        self._admin.flush()

    def result(self, received: Deferred[HarnessResponse]) -> HarnessResponse:
        """
        The response, which must have arrived.

        @raise AssertionError: It has not (yet).
        """
        self.flush()
        outcome: list[Any] = []
        received.addBoth(outcome.append)
        if not outcome:
            raise AssertionError("no response yet")
        if isinstance(outcome[0], HarnessResponse):
            return outcome[0]
        outcome[0].raiseException()
        raise AssertionError("unreachable")

    def request(
        self, method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None
    ) -> HarnessResponse:
        """
        Send a request to ingress and return its response, which must come
        without the clock moving.
        """
        return self.result(self.send(method, path, body, headers))

    def admin(self, method: str, path: str) -> HarnessResponse:
        """
        Send a request to the admin API and return its response.
        """
        return self.result(self.sendAdmin(method, path))
