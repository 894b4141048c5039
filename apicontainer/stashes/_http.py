"""
The C{http} stash: forwards each mutation to a downstream HTTP API, with treq.

The resource URL is C{url} + key. Before forwarding, the stash takes a
before-image with a GET (404: absent) and records it durably in a local
SQLite file beside the data directory's other stores; the forward carries
C{Idempotency-Key: apicontainer-<uow>} so that a downstream that honours it
applies a replay once. The downstream's 2xx, 4xx or 5xx is the verdict; a
connection error is a 503 (a timeout, the worker's 504).

Rollback compensates: a before-image of 404 is restored with DELETE, one of
200 with a PUT of the old body and content type. A rollback whose write a
later UOW replaced leaves the downstream alone and hands its before-image
to the later UOW's rollback, as the other stashes do.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any, Mapping

import treq
from twisted.internet.defer import CancelledError, Deferred
from twisted.logger import Logger
from twisted.web.http_headers import Headers
from zope.interface import implementer

from ..blocking import Blocking
from ..config import StashSpec
from ..interfaces import ILocalStorage, IProbe, IPrunable, IReader, IStartable, IStash
from ..storage import immediate
from ..uow import Document, UnitOfWork, Verdict
from ._context import StashContext, released

PREPARED = "prepared"
ROLLED_BACK = "rolledback"


class DownstreamError(Exception):
    """
    The downstream did not accept a compensating request.
    """


@implementer(IStash, IReader, IStartable, IProbe, ILocalStorage, IPrunable)
class HTTPStash:
    """
    A downstream HTTP API as a stash.

    @param http: Anything with treq's C{request} method (treq, an
        C{HTTPClient}, a C{StubTreq}).
    """

    log = Logger()

    def __init__(
        self,
        name: str,
        url: str,
        undoPath: Path,
        blocking: Blocking,
        headers: Mapping[str, str] | None = None,
        http: Any = treq,
    ) -> None:
        self.name = name
        self.url = url.rstrip("/")
        self._undoPath = undoPath
        self._blocking = blocking
        self._headers = dict(headers or {})
        self._http = http
        self._db: sqlite3.Connection | None = None

    @classmethod
    def fromConfig(cls, spec: StashSpec, context: StashContext) -> HTTPStash:
        """
        Build the stash from its options: C{url} (the base URL; the key is
        appended) and C{headers} (sent with every request, for example an
        C{Authorization}).
        """
        url = spec.options.string("url")
        if not url.startswith(("http://", "https://")):
            raise spec.options.error("url", f"must be an http:// or https:// URL, not {url!r}")
        headers = spec.options.section("headers")
        values = {name: headers.string(name) for name in headers.keys()}
        return cls(
            spec.name,
            url,
            context.path(f"{spec.name}.http-undo.sqlite3"),
            context.serial(spec.name),
            values,
        )

    # The local record of before-images and of the newest UOW per key.

    @property
    def location(self) -> Path:
        return self._undoPath.parent

    @property
    def files(self) -> tuple[Path, ...]:
        return (self._undoPath,)

    def prune(self, horizon: int) -> Deferred[int]:
        def delete() -> int:
            with immediate(self._local()) as db:
                cursor = db.execute("DELETE FROM undo WHERE state = ? AND attempt < ?", (ROLLED_BACK, horizon))
            return int(cursor.rowcount)

        return self._blocking(delete)

    def bytesFor(self, size: int) -> int:
        # The before-image fetched from downstream, kept in the undo database.
        return size + 256 * 1024

    def start(self) -> Deferred[None]:
        return self._blocking(self._open)

    def _open(self) -> None:
        self._undoPath.parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(self._undoPath, isolation_level=None, check_same_thread=False)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        db.execute("CREATE TABLE IF NOT EXISTS keys (key TEXT PRIMARY KEY, uow INTEGER NOT NULL)")
        db.execute(
            "CREATE TABLE IF NOT EXISTS undo (uow INTEGER PRIMARY KEY, attempt INTEGER NOT NULL,"
            " key TEXT NOT NULL, state TEXT NOT NULL, had_row INTEGER NOT NULL, body BLOB,"
            " content_type TEXT, prev_uow INTEGER)"
        )
        self._db = db

    def stop(self) -> Deferred[None]:
        def close() -> None:
            if self._db is not None:
                self._db.close()
                self._db = None

        return released(self._blocking, self._blocking(close))

    def _local(self) -> sqlite3.Connection:
        if self._db is None:
            self._open()
        assert self._db is not None
        return self._db

    def _query(self, sql: str, *args: Any) -> Deferred[Any]:
        return self._blocking(lambda: self._local().execute(sql, args).fetchone())

    def _change(self, *statements: tuple[str, tuple[Any, ...]]) -> Deferred[None]:
        def run() -> None:
            with immediate(self._local()) as db:
                for sql, args in statements:
                    db.execute(sql, args)

        return self._blocking(run)

    # Talking to the downstream.

    def _request(self, method: str, key: str, body: bytes | None = None, contentType: str | None = None, **extra: str) -> Deferred[Any]:
        headers = Headers()
        for name, value in {**self._headers, **extra}.items():
            headers.addRawHeader(name, value)
        if contentType:
            headers.addRawHeader("Content-Type", contentType)
        return self._http.request(method, self.url + key, data=body, headers=headers)  # type: ignore[no-any-return]

    async def _fetch(self, key: str) -> tuple[int, bytes, str | None]:
        response = await self._request("GET", key)
        body = await treq.content(response)
        contentType = response.headers.getRawHeaders("content-type", [None])[0]
        return response.code, body, contentType

    # IStash

    def stash(self, uow: UnitOfWork) -> Deferred[Verdict]:
        return Deferred.fromCoroutine(self._stash(uow))

    async def _stash(self, uow: UnitOfWork) -> Verdict:
        undo = await self._query("SELECT attempt, state FROM undo WHERE uow = ?", uow.id)
        newest = await self._query("SELECT uow FROM keys WHERE key = ?", uow.key)
        if undo is not None:
            if undo[1] == PREPARED:
                if newest is not None and newest[0] == uow.id:
                    # The before-image is recorded, but a crash may have
                    # come before the forward: forward again (the same
                    # Idempotency-Key goes with it).
                    return await self._forward(uow)
                return Verdict.stored(detail="already stored")
            if undo[0] >= uow.attempt:
                return Verdict.declined("rolled back before it arrived")
        if newest is not None and newest[0] >= uow.id:
            if newest[0] == uow.id:
                return Verdict.stored(detail="already stored")
            return Verdict.declined(f"superseded by UOW {newest[0]}")
        try:
            status, before, beforeType = await self._fetch(uow.key)
        except Exception as e:
            return self._unreachable(uow, e)
        if status not in (200, 404):
            return Verdict.failed(503, f"before-image GET answered {status}")
        had = status == 200
        await self._change(
            (
                "INSERT INTO undo (uow, attempt, key, state, had_row, body, content_type, prev_uow)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (uow) DO UPDATE SET"
                " attempt = excluded.attempt, state = excluded.state, had_row = excluded.had_row,"
                " body = excluded.body, content_type = excluded.content_type,"
                " prev_uow = excluded.prev_uow",
                (
                    uow.id,
                    uow.attempt,
                    uow.key,
                    PREPARED,
                    int(had),
                    before if had else None,
                    beforeType if had else None,
                    newest[0] if newest else None,
                ),
            ),
            (
                "INSERT INTO keys (key, uow) VALUES (?, ?) ON CONFLICT (key) DO UPDATE SET uow = excluded.uow",
                (uow.key, uow.id),
            ),
        )
        return await self._forward(uow)

    async def _forward(self, uow: UnitOfWork) -> Verdict:
        try:
            response = await self._request(
                uow.method,
                uow.key,
                None if uow.isDelete else uow.body,
                None if uow.isDelete else uow.contentType,
                **{"Idempotency-Key": f"apicontainer-{uow.id}"},
            )
            await treq.content(response)
        except Exception as e:
            return self._unreachable(uow, e)
        if 200 <= response.code < 300:
            return Verdict.stored(status=response.code)
        if uow.isDelete and response.code == 404:
            return Verdict.stored(status=404, detail="already absent downstream")
        if 400 <= response.code < 600:
            return Verdict.failed(response.code, f"downstream answered {response.code}")
        return Verdict.failed(502, f"downstream answered {response.code}")

    def _unreachable(self, uow: UnitOfWork, error: Exception) -> Verdict:
        """
        The verdict for a downstream that could not be reached; a call that
        was cancelled (the worker's timeout) stays cancelled.
        """
        reasons = getattr(error, "reasons", None) or []
        if isinstance(error, CancelledError) or any(r.check(CancelledError) for r in reasons):
            raise CancelledError() from error
        self.log.warn(
            "stash {stash} could not reach {url} for UOW {uow}: {error}",
            stash=self.name,
            url=self.url,
            uow=uow.id,
            error=f"{type(error).__name__}: {error}",
        )
        return Verdict.failed(503, f"http: {type(error).__name__}")

    def rollback(self, uow: UnitOfWork) -> Deferred[None]:
        return Deferred.fromCoroutine(self._rollback(uow))

    async def _rollback(self, uow: UnitOfWork) -> None:
        undo = await self._query(
            "SELECT attempt, state, had_row, body, content_type, prev_uow FROM undo WHERE uow = ?", uow.id
        )
        if undo is None:
            await self._change(
                (
                    "INSERT INTO undo (uow, attempt, key, state, had_row) VALUES (?, ?, ?, ?, 0)",
                    (uow.id, uow.attempt, uow.key, ROLLED_BACK),
                )
            )
            return
        attempt, state, had, body, contentType, previous = undo
        changes: list[tuple[str, tuple[Any, ...]]] = []
        if state == PREPARED:
            newest = await self._query("SELECT uow FROM keys WHERE key = ?", uow.key)
            if newest is not None and newest[0] != uow.id:
                changes.append(
                    (
                        "UPDATE undo SET had_row = ?, body = ?, content_type = ?, prev_uow = ?"
                        " WHERE key = ? AND prev_uow = ? AND state = ?",
                        (had, body, contentType, previous, uow.key, uow.id, PREPARED),
                    )
                )
            else:
                await self._compensate(uow.key, bool(had), body, contentType)
                if previous is None:
                    changes.append(("DELETE FROM keys WHERE key = ?", (uow.key,)))
                else:
                    changes.append(("UPDATE keys SET uow = ? WHERE key = ?", (previous, uow.key)))
        changes.append(
            (
                "UPDATE undo SET state = ?, attempt = ?, had_row = 0, body = NULL,"
                " content_type = NULL, prev_uow = NULL WHERE uow = ?",
                (ROLLED_BACK, max(attempt, uow.attempt), uow.id),
            )
        )
        await self._change(*changes)

    async def _compensate(self, key: str, had: bool, body: bytes | None, contentType: str | None) -> None:
        if had:
            response = await self._request("PUT", key, body or b"", contentType)
            acceptable = 200 <= response.code < 300
        else:
            response = await self._request("DELETE", key)
            acceptable = 200 <= response.code < 300 or response.code == 404
        await treq.content(response)
        if not acceptable:
            raise DownstreamError(f"compensating {'PUT' if had else 'DELETE'} {key} answered {response.code}")

    def commit(self, uow: UnitOfWork) -> Deferred[None]:
        return self._change(("DELETE FROM undo WHERE uow = ?", (uow.id,)))

    def probe(self) -> Deferred[None]:
        """
        Any HTTP answer to a GET of the base URL means the downstream is
        reachable.
        """
        return self._request("GET", "").addCallback(treq.content).addCallback(lambda _: None)  # type: ignore[no-any-return]

    # IReader

    def read(self, key: str) -> Deferred[Document | None]:
        async def read() -> Document | None:
            status, body, contentType = await self._fetch(key)
            if status == 404:
                return None
            if status != 200:
                raise DownstreamError(f"GET {key} answered {status}")
            newest = await self._query("SELECT uow FROM keys WHERE key = ?", key)
            return Document(body, contentType, newest[0] if newest else 0)

        return Deferred.fromCoroutine(read())
