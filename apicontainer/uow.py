"""
Units of work, the verdicts stashes give on them, and their reports.
"""

from __future__ import annotations

import hashlib
import os
from enum import Enum
from pathlib import Path
from typing import IO, Any, Iterator, Mapping

from attrs import Factory, define, field, frozen

from ._multipart import Part, findPart

MUTATING_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})

#: Bodies up to this size are held in memory; larger ones stay on disk and
#: are read when a stash needs them, so that memory does not grow with the
#: number of large requests in flight.
INLINE_BODY_BYTES = 64 * 1024
CHUNK_BYTES = 64 * 1024


@frozen
class SpooledBody:
    """
    A body too large to hold in memory: C{length} bytes at C{offset} of a
    file, read again each time it is needed.

    @ivar source: The path of the file (the UOW's spool file), or an open
        seekable file (the request's body, before it is spooled), which is
        read from one thread at a time.
    """

    source: Path | IO[bytes]
    offset: int
    length: int

    def chunks(self, size: int = CHUNK_BYTES) -> Iterator[bytes]:
        """
        The body, C{size} bytes at a time.

        @raise OSError: The file is gone or shorter than the body.
        """
        if isinstance(self.source, Path):
            with open(self.source, "rb") as f:
                yield from self._read(f, size)
        else:
            yield from self._read(self.source, size)

    def _read(self, f: IO[bytes], size: int) -> Iterator[bytes]:
        f.seek(self.offset)
        left = self.length
        while left:
            chunk = f.read(min(size, left))
            if not chunk:
                raise OSError(f"{self.source} ended {left} bytes before the body's end")
            left -= len(chunk)
            yield chunk

    def read(self) -> bytes:
        """
        The whole body, read now.
        """
        return b"".join(self.chunks())

    @staticmethod
    def lengthOf(body: bytes | SpooledBody) -> int:
        """
        The length of C{body}, held or not, without reading it.
        """
        return body.length if isinstance(body, SpooledBody) else len(body)

    @classmethod
    def ofFile(cls, f: IO[bytes]) -> bytes | SpooledBody:
        """
        The body in C{f} (from its start): its bytes when it is small, else
        a reference to it.
        """
        f.seek(0, os.SEEK_END)
        length = f.tell()
        f.seek(0)
        if length <= INLINE_BODY_BYTES:
            return f.read()
        return cls(f, 0, length)


@define
class UnitOfWork:
    """
    One spooled mutation: what a client asked for, under its UOW id.

    The body is read-only; every stash sees the same bytes, in every attempt.

    @ivar id: The UOW id, unique for the life of the data directory.
    @ivar attempt: The attempt id: the UOW id for the first delivery; each
        later attempt (a retry, or a re-drive after a crash) takes a fresh id
        from the same sequence, so the attempts of a UOW are ordered and never
        repeat, also across restarts. Stashes use it to tell a late call of a
        rolled-back attempt from a new attempt.
    @ivar method: C{POST}, C{PUT}, C{PATCH} or C{DELETE}.
    @ivar key: The resource key: the normalized request path.
    @ivar route: The configured route pattern that matched the key.
    @ivar contentType: The request's C{Content-Type}, if it had one.
    @ivar body: The request body (L{bytes}; a large body is read from disk
        at each access, see L{bodyLength} and L{bodyChunks}).
    @ivar receivedAt: When ingress accepted the request (POSIX seconds).
    @ivar idempotencyKey: The request's C{Idempotency-Key}, if any.
    """

    id: int
    method: str
    key: str
    route: str
    _body: bytes | SpooledBody = field(alias="body", eq=lambda body: body.read() if isinstance(body, SpooledBody) else body)
    contentType: str | None = None
    receivedAt: float = 0.0
    idempotencyKey: str | None = None
    attempt: int = 1
    _parts: dict[str, Part | None] = field(
        default=Factory(dict), eq=False, repr=False, alias="_parts"
    )
    _digest: str | None = field(default=None, eq=False, repr=False, alias="_digest")

    @property
    def body(self) -> bytes:
        """
        The request body. A body larger than L{INLINE_BODY_BYTES} is not
        held: each access reads it again from disk (in the thread that
        asks), so read it once per use, where blocking is allowed.
        """
        if isinstance(self._body, SpooledBody):
            return self._body.read()
        return self._body

    @property
    def bodyLength(self) -> int:
        """
        The length of the body, without reading it.
        """
        return SpooledBody.lengthOf(self._body)

    def bodyChunks(self) -> Iterator[bytes]:
        """
        The body in pieces of at most L{CHUNK_BYTES} (from disk for a large
        body), to stream it.
        """
        if isinstance(self._body, SpooledBody):
            return self._body.chunks()
        return iter([self._body] if self._body else [])

    @property
    def isRetry(self) -> bool:
        """
        Whether this is a later attempt: a retry or a re-drive after a crash.
        """
        return self.attempt != self.id

    def payloadHash(self) -> str:
        """
        A digest of what the request asks for (method, key, content type and
        body), to tell a repeat of it from another request under the same
        C{Idempotency-Key}. Computed once per UOW: a copy with another body
        must be made with C{_digest=None}.
        """
        if self._digest is not None:
            return self._digest
        digest = hashlib.sha256()
        for part in (self.method, self.key, self.contentType or ""):
            encoded = part.encode("utf-8", "surrogateescape")
            digest.update(b"%d:%s" % (len(encoded), encoded))
        for chunk in self.bodyChunks():
            digest.update(chunk)
        self._digest = digest.hexdigest()
        return self._digest

    @property
    def isDelete(self) -> bool:
        """
        Whether this UOW removes the document rather than writing one.
        """
        return self.method == "DELETE"

    def part(self, name: str) -> Part | None:
        """
        The multipart form part called C{name}, parsed once per UOW.

        @return: The part, or L{None} when the body is not
            C{multipart/form-data} or has no such part.
        """
        if name not in self._parts:
            self._parts[name] = findPart(self.contentType, self.body, name)
        return self._parts[name]


class VerdictKind(str, Enum):
    """
    What a stash made of a UOW.
    """

    declined = "declined"
    stored = "stored"
    failed = "failed"


@frozen
class Verdict:
    """
    A stash's answer for one UOW.

    @ivar kind: declined, stored or failed.
    @ivar status: An HTTP status: 2xx for declined and stored, 4xx or 5xx for
        failed.
    @ivar detail: Why, in a few words, for the report and the logs.
    """

    kind: VerdictKind
    status: int
    detail: str | None = None

    @classmethod
    def stored(cls, status: int = 200, detail: str | None = None) -> Verdict:
        """
        The mutation is held and its rollback prepared.
        """
        return cls(VerdictKind.stored, status, detail)

    @classmethod
    def declined(cls, detail: str | None = None, status: int = 204) -> Verdict:
        """
        The stash has nothing to do for this UOW; it changed nothing.
        """
        return cls(VerdictKind.declined, status, detail)

    @classmethod
    def failed(cls, status: int, detail: str | None = None) -> Verdict:
        """
        The stash could not apply the mutation: 4xx when the request is at
        fault, 5xx when the destination is.
        """
        if not 400 <= status <= 599:
            raise ValueError(f"a failed verdict needs a 4xx or 5xx status, not {status}")
        return cls(VerdictKind.failed, status, detail)

    @property
    def ok(self) -> bool:
        """
        Whether the verdict lets the UOW commit.
        """
        return self.kind is not VerdictKind.failed

    @property
    def refused(self) -> bool:
        """
        Whether the stash definitely stored nothing in this attempt: a
        failure with a 4xx status. On a UOW's first attempt its rollback is
        not called, since it could only touch a destination that refused the
        write (and might hold a newer value by now); a later attempt rolls
        it back all the same, for what an earlier attempt cut short by a
        crash may have left there. A 5xx, a timeout or a lost connection
        leaves the outcome unknown, and is rolled back.
        """
        return self.kind is VerdictKind.failed and self.status < 500

    def asJSON(self, forClient: bool = False) -> dict[str, Any]:
        """
        The verdict as it appears in responses and logs.

        @param forClient: Leave out the detail of a 5xx: it describes the
            destination's fault (paths, hosts) and is for operators, who see
            it in the log and the admin API.
        """
        result: dict[str, Any] = {"verdict": self.kind.value, "status": self.status}
        if self.detail and not (forClient and self.status >= 500):
            result["detail"] = self.detail
        return result

    @classmethod
    def fromJSON(cls, data: Mapping[str, Any]) -> Verdict:
        """
        The inverse of L{asJSON}.
        """
        return cls(VerdictKind(data["verdict"]), int(data["status"]), data.get("detail"))


class Status(str, Enum):
    """
    Where a UOW stands: the one vocabulary of the report, the state store,
    the in-memory records, the fail queue, the admin API and the metrics.

    @cvar received: Spooled; waits for the fanout.
    @cvar applying: Out to its stashes.
    @cvar stored: In every stash that did not decline (final).
    @cvar rejected: A stash refused it with a 4xx; rolled back (final).
    @cvar superseded: A retried or recovered UOW found a newer one stored on
        its key; rolled back instead of applied (final).
    @cvar dropped: Dropped from the fail queue by an operator (final).
    @cvar queued: A stash failed with a 5xx; rolled back, in the fail queue,
        waiting for its next attempt.
    @cvar retrying: In the fail queue, with an attempt under way.
    @cvar parked: In the fail queue, out of attempts; waits for an operator.
    @cvar stuck: In the fail queue: rejected, but its rollback kept failing;
        waits for an operator.
    @cvar unsettled: Its outcome could not be recorded (a full disk); the
        running server re-drives it until it settles.
    """

    received = "received"
    applying = "applying"
    stored = "stored"
    rejected = "rejected"
    superseded = "superseded"
    dropped = "dropped"
    queued = "queued"
    retrying = "retrying"
    parked = "parked"
    stuck = "stuck"
    unsettled = "unsettled"


FINAL = (Status.stored, Status.rejected, Status.superseded, Status.dropped)
"""
The statuses a UOW ends in, kept in the state store.
"""

FAILED = (Status.queued, Status.retrying, Status.parked, Status.stuck)
"""
The statuses of a UOW in the fail queue.
"""

OUTCOMES = (Status.stored, Status.rejected, Status.queued)
"""
The outcomes of one attempt (L{Report.outcome}).
"""


@frozen
class Report:
    """
    The outcome of one attempt at a UOW, with every stash's verdict.

    @ivar verdicts: Stash name to verdict, in configuration order.
    """

    uow: int
    key: str
    outcome: Status
    status: int
    verdicts: Mapping[str, Verdict]

    @classmethod
    def fromVerdicts(cls, uow: UnitOfWork, verdicts: Mapping[str, Verdict]) -> Report:
        """
        Decide the outcome from the verdicts, given in configuration order.

        All 2xx: stored (200). Any 4xx: rejected with the first 4xx in
        configuration order. Otherwise queued with the first 5xx.
        """
        failures = [v.status for v in verdicts.values() if not v.ok]
        clientErrors = [status for status in failures if status < 500]
        if not failures:
            return cls(uow.id, uow.key, Status.stored, 200, verdicts)
        if clientErrors:
            return cls(uow.id, uow.key, Status.rejected, clientErrors[0], verdicts)
        return cls(uow.id, uow.key, Status.queued, failures[0], verdicts)

    def asJSON(self, forClient: bool = False) -> dict[str, Any]:
        """
        The report as the response body of the mutation (C{forClient}) or
        with every detail, for the fail queue and the logs.
        """
        return {
            "uow": self.uow,
            "outcome": self.outcome.value,
            "stashes": {name: v.asJSON(forClient) for name, v in self.verdicts.items()},
        }

    @classmethod
    def fromJSON(cls, data: Mapping[str, Any]) -> Report:
        """
        The inverse of L{asJSON}, with the key and status stored beside it.
        """
        return cls(
            uow=int(data["uow"]),
            key=data["key"],
            outcome=Status(data["outcome"]),
            status=int(data["status"]),
            verdicts={
                name: Verdict.fromJSON(v) for name, v in data["stashes"].items()
            },
        )

    def asRecord(self) -> dict[str, Any]:
        """
        The report with its key and status, as stored in the fail queue.
        """
        return {**self.asJSON(), "key": self.key, "status": self.status}


@frozen
class Document:
    """
    What a reader holds under a key.
    """

    body: bytes
    contentType: str | None
    uow: int
