"""
Fakes and a harness for unit tests of stashes and of whole pipelines.

Shipped for users: a test of your own stash, or of a configuration, drives
UOWs through a real pipeline on a L{twisted.internet.task.Clock}, without
sockets, threads or real time::

    from twisted.trial.unittest import SynchronousTestCase
    from apicontainer.testing import ContainerHarness, MemoryStash

    class MyTests(SynchronousTestCase):
        def test_write(self):
            records = MemoryStash("records")
            harness = ContainerHarness(self.mktemp(), [records])
            response = harness.request("PUT", "/items/1", b"{}")
            self.assertEqual(response.code, 200)
            self.assertEqual(records.documents["/items/1"].body, b"{}")
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable, Sequence

from attrs import define
from treq.testing import StubTreq
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from zope.interface import implementer

from .admin import AdminAPI
from .blocking import inline
from .config import Config, Limits, RouteSpec, StashSpec
from .container import Container
from .failqueue import RetryPolicy
from .ingress import Ingress
from .interfaces import IReader, IStash
from .uow import Document, UnitOfWork, Verdict

__all__ = ["MemoryStash", "ContainerHarness", "HarnessResponse"]


@define
class _Undo:
    attempt: int
    state: str
    before: Document | None = None


@implementer(IStash, IReader)
class MemoryStash:
    """
    A stash that keeps documents in a dict, with the same rules as the
    built-in stashes, and that can be told to misbehave.

    @ivar documents: Key to the current L{Document}; a deleted document is a
        L{Document} whose body is L{None}.
    @ivar failWith: When set, C{stash} fails with this status.
    @ivar failAfterWrite: When true, C{stash} writes and then fails with
        C{failWith}: a stash that failed halfway.
    @ivar hang: When true, C{stash} never answers (until cancelled, as the
        stash worker's timeout does).
    @ivar failRollback: When true, C{rollback} fails.
    @ivar calls: Every call, as C{(method, uow id)}, in order.
    """

    def __init__(
        self,
        name: str,
        failWith: int | None = None,
        failAfterWrite: bool = False,
        hang: bool = False,
        failRollback: bool = False,
    ) -> None:
        self.name = name
        self.failWith = failWith
        self.failAfterWrite = failAfterWrite
        self.hang = hang
        self.failRollback = failRollback
        self.documents: dict[str, Document] = {}
        self.undo: dict[int, _Undo] = {}
        self.calls: list[tuple[str, int]] = []
        self.hanging: list[Deferred[Verdict]] = []

    def stash(self, uow: UnitOfWork) -> Deferred[Verdict]:
        self.calls.append(("stash", uow.id))
        if self.hang:
            waiting: Deferred[Verdict] = Deferred()
            self.hanging.append(waiting)
            return waiting
        if self.failWith is not None and not self.failAfterWrite:
            return succeed(Verdict.failed(self.failWith, "told to fail"))
        verdict = self._apply(uow)
        if self.failWith is not None:
            return succeed(Verdict.failed(self.failWith, "told to fail after writing"))
        return succeed(verdict)

    def _apply(self, uow: UnitOfWork) -> Verdict:
        undo = self.undo.get(uow.id)
        if undo is not None:
            if undo.state == "prepared":
                return Verdict.stored(detail="already stored")
            if undo.attempt >= uow.attempt:
                return Verdict.declined("rolled back before it arrived")
        current = self.documents.get(uow.key)
        if current is not None and current.uow >= uow.id:
            if current.uow == uow.id:
                return Verdict.stored(detail="already stored")
            return Verdict.declined(f"superseded by UOW {current.uow}")
        self.undo[uow.id] = _Undo(uow.attempt, "prepared", current)
        body: Any = None if uow.isDelete else uow.body
        self.documents[uow.key] = Document(body, uow.contentType, uow.id)
        return Verdict.stored()

    def rollback(self, uow: UnitOfWork) -> Deferred[None]:
        self.calls.append(("rollback", uow.id))
        if self.failRollback:
            raise OSError("told to fail rollback")
        undo = self.undo.get(uow.id)
        if undo is None:
            self.undo[uow.id] = _Undo(uow.attempt, "rolledback")
            return succeed(None)
        if undo.state == "prepared":
            current = self.documents.get(uow.key)
            if current is not None and current.uow == uow.id:
                if undo.before is None:
                    del self.documents[uow.key]
                else:
                    self.documents[uow.key] = undo.before
            else:
                for later in self.undo.values():
                    if later.state == "prepared" and later.before is not None and later.before.uow == uow.id:
                        later.before = undo.before
        self.undo[uow.id] = _Undo(max(undo.attempt, uow.attempt), "rolledback")
        return succeed(None)

    def commit(self, uow: UnitOfWork) -> Deferred[None]:
        self.calls.append(("commit", uow.id))
        self.undo.pop(uow.id, None)
        return succeed(None)

    def read(self, key: str) -> Deferred[Document | None]:
        document = self.documents.get(key)
        if document is None or document.body is None:
            return succeed(None)
        return succeed(document)

    def bodies(self) -> dict[str, bytes]:
        """
        Key to body of every document present (deleted ones left out).
        """
        return {k: d.body for k, d in self.documents.items() if d.body is not None}


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
    ) -> None:
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
        self.container = Container(config, dict(zip(names, stashes)), self.clock, inline)
        self.container.open()
        started = Deferred.fromCoroutine(self.container.start())
        if not started.called:
            raise RuntimeError("a stash's start() did not finish synchronously")
        self.ingress = Ingress(self.container, limits, self.clock)
        self._client = StubTreq(self.ingress.app.resource())
        self._admin = StubTreq(AdminAPI(self.container).app.resource())

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
            response = await client.request(
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
