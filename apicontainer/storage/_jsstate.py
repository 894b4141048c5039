"""
The shared state of the C{jetstream} backends, in JetStream key-value
buckets with the stream's replicas: final UOW states, the last stored UOW
of each key, idempotency records, and the fail queue.
"""

from __future__ import annotations

import asyncio
import builtins
import hashlib
import json
import random
from typing import Any, Callable

from attrs import evolve
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from zope.interface import implementer

from ..interfaces import IFailQueue
from ..uow import Report, Status
from ._failqueue import FailedUOW, RetryPolicy, Taken, nextEntry
from ._jetstream import JetStreamLink, aio
from ._states import StateRecord


def keyName(text: str) -> str:
    """
    A bucket key for any text (keys allow few characters).
    """
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _recordJSON(r: StateRecord) -> bytes:
    return json.dumps(
        [r.uow, r.key, r.route, r.state.value, r.status, r.report, r.idempotencyKey, r.payloadHash, r.at]
    ).encode("utf-8")


def _record(data: bytes) -> StateRecord:
    uow, key, route, state, *rest = json.loads(data)
    return StateRecord(uow, key, route, Status(state), *rest)


class SharedStates:
    """
    The state store of the C{jetstream} spool (the calls of
    L{apicontainer.storage.StateStore} the pipeline makes), over buckets
    whose entries expire after the idempotency retention.
    """

    def __init__(self, link: JetStreamLink) -> None:
        self.link = link

    def _bucket(self, what: str) -> Any:
        return self.link.buckets[what]

    def open(self) -> None:
        pass

    def record(self, record: StateRecord) -> Deferred[None]:
        return aio(self.put(record))

    async def put(self, record: StateRecord) -> None:
        """
        Record C{record}: its final state and, at the same time, when it was
        stored, that it is the last stored UOW of its key (never lowering
        it), and its idempotency key's UOW. Should a crash leave the last
        two undone, L{completed} does them when the UOW is delivered again.
        """
        await asyncio.gather(
            self._bucket("states").put(f"u{record.uow}", _recordJSON(record)), self._index(record)
        )

    def completed(self, record: StateRecord) -> Deferred[None]:
        """
        Make sure what L{put} records besides the final state is there.
        """
        return aio(self._index(record))

    async def _index(self, record: StateRecord) -> None:
        if record.state is Status.stored:
            await self._raiseLast(record.key, record.uow)
        if record.idempotencyKey is not None:
            await self._claimKey(record.idempotencyKey, record.payloadHash or "", record.uow)

    async def _raiseLast(self, key: str, uowId: int) -> None:
        from nats.js.errors import KeyWrongLastSequenceError
        from nats.js.errors import NotFoundError  # a key never written, or deleted

        bucket = self._bucket("last")
        name = keyName(key)
        while True:
            try:
                entry = await bucket.get(name)
            except NotFoundError:
                try:
                    await bucket.create(name, str(uowId).encode())
                    return
                except KeyWrongLastSequenceError:
                    continue
            if int(entry.value) >= uowId:
                return
            try:
                await bucket.update(name, str(uowId).encode(), last=entry.revision)
                return
            except KeyWrongLastSequenceError:
                continue

    def claimKey(self, idempotencyKey: str, payloadHash: str, uowId: int) -> Deferred[tuple[str, int]]:
        """
        Record that C{idempotencyKey} belongs to UOW C{uowId}, unless it
        belongs to another already.

        @return: A Deferred that fires with the digest and UOW id the key
            belongs to.
        """
        return aio(self._claimKey(idempotencyKey, payloadHash, uowId))

    async def _claimKey(self, idempotencyKey: str, payloadHash: str, uowId: int) -> tuple[str, int]:
        from nats.js.errors import KeyWrongLastSequenceError

        bucket = self._bucket("idempotency")
        name = keyName(idempotencyKey)
        try:
            await bucket.create(name, json.dumps([payloadHash, uowId]).encode())
            return payloadHash, uowId
        except KeyWrongLastSequenceError:
            held = await self._holderOf(idempotencyKey)
            return held if held is not None else (payloadHash, uowId)

    def holderOf(self, idempotencyKey: str) -> Deferred[tuple[str, int] | None]:
        """
        The digest and UOW id C{idempotencyKey} belongs to, if any.
        """
        return aio(self._holderOf(idempotencyKey))

    async def _holderOf(self, idempotencyKey: str) -> tuple[str, int] | None:
        from nats.js.errors import NotFoundError  # a key never written, or deleted

        try:
            entry = await self._bucket("idempotency").get(keyName(idempotencyKey))
        except NotFoundError:
            return None
        if entry.value is None:
            return None
        payloadHash, uowId = json.loads(entry.value)
        return payloadHash, int(uowId)

    def get(self, uowId: int) -> Deferred[StateRecord | None]:
        return aio(self._get(uowId))

    async def _get(self, uowId: int) -> StateRecord | None:
        from nats.js.errors import NotFoundError  # a key never written, or deleted

        try:
            entry = await self._bucket("states").get(f"u{uowId}")
        except NotFoundError:
            return None
        return _record(entry.value) if entry.value else None

    def byIdempotencyKey(self, key: str) -> Deferred[StateRecord | None]:
        return aio(self._byIdempotencyKey(key))

    async def _byIdempotencyKey(self, key: str) -> StateRecord | None:
        held = await self._holderOf(key)
        return None if held is None else await self._get(held[1])

    def lastStored(self, key: str) -> Deferred[int | None]:
        return aio(self._lastStored(key))

    async def _lastStored(self, key: str) -> int | None:
        from nats.js.errors import NotFoundError  # a key never written, or deleted

        try:
            entry = await self._bucket("last").get(keyName(key))
        except NotFoundError:
            return None
        return int(entry.value) if entry.value else None

    def finalIds(self, uowIds: list[int]) -> Deferred[set[int]]:
        return aio(self._finalIds(uowIds))

    async def _finalIds(self, uowIds: list[int]) -> set[int]:
        return {uowId for uowId in uowIds if await self._get(uowId) is not None}

    def purge(self, before: float) -> Deferred[int]:
        # The buckets expire their entries themselves.
        return succeed(0)


@implementer(IFailQueue)
class SharedFailQueue:
    """
    L{apicontainer.interfaces.IFailQueue} shared by every instance: an entry
    per UOW in a bucket, mirrored in memory by a watch. An entry goes to one
    instance at a time: taking it for an attempt is a compare-and-set on
    its revision, and it carries a lease (C{nextAttemptAt} while it is being
    retried) after which another instance may take it, should the first
    have died mid-attempt.
    """

    log = Logger()

    def __init__(
        self,
        link: JetStreamLink,
        clock: IReactorTime,
        retry: RetryPolicy,
        uniform: Callable[[], float] = random.random,
        lease: float = 300.0,
    ) -> None:
        self.link = link
        self.retry = retry
        self.lease = lease
        self._clock = clock
        self._uniform = uniform
        self._entries: dict[int, tuple[FailedUOW, int]] = {}
        # The revisions of the entries this instance took for an attempt.
        self._taken: dict[int, int] = {}
        self._watching: Any = None
        link.onConnected.append(self._watch)

    def open(self) -> list[Any]:
        return []

    async def _watch(self) -> None:

        watcher = await self.link.buckets["failed"].watchall()
        loading = True
        while loading:
            entry = await watcher.updates(timeout=30)
            if entry is None:
                loading = False
            else:
                self._apply(entry)
        self._watching = asyncio.ensure_future(self._follow(watcher))

    async def _follow(self, watcher: Any) -> None:

        while True:
            try:
                entry = await watcher.updates(timeout=3600)
            except asyncio.CancelledError:
                return
            except Exception:
                await asyncio.sleep(0.5)
                continue
            if entry is not None:
                self._apply(entry)

    def _apply(self, entry: Any) -> None:
        uowId = int(entry.key[1:])
        if entry.operation in ("DEL", "PURGE") or not entry.value:
            self._entries.pop(uowId, None)
            return
        known = self._entries.get(uowId)
        if known is None or known[1] <= entry.revision:
            self._entries[uowId] = (FailedUOW.fromJSON(json.loads(entry.value)), entry.revision)

    def failed(
        self,
        report: Report,
        route: str,
        rollbackFailed: tuple[str, ...] = (),
        compensate: bool = False,
    ) -> FailedUOW:
        known = self._entries.get(report.uow)
        previous = known[0] if known else None
        now, uniform = self._clock.seconds(), self._uniform()
        return nextEntry(previous, report, route, self.retry, now, uniform, rollbackFailed, compensate)

    def put(self, entry: FailedUOW) -> Deferred[None]:
        return aio(self._put(entry))

    async def _put(self, entry: FailedUOW) -> None:
        """
        Record C{entry}. After an attempt this instance took it for, only if
        nobody changed it meanwhile (an operator dropped it): a dropped
        entry stays dropped.
        """
        from nats.js.errors import KeyWrongLastSequenceError

        bucket = self.link.buckets["failed"]
        taken = self._taken.pop(entry.uow, None)
        if taken is None:
            revision = await bucket.put(f"u{entry.uow}", _entryJSON(entry))
        else:
            try:
                revision = await bucket.update(f"u{entry.uow}", _entryJSON(entry), last=taken)
            except KeyWrongLastSequenceError:
                self.log.warn("UOW {uow} was dropped during its attempt: not queued again", uow=entry.uow)
                return
        self._entries[entry.uow] = (entry, revision)

    def get(self, uowId: int) -> FailedUOW | None:
        known = self._entries.get(uowId)
        return known[0] if known else None

    def fresh(self, uowId: int) -> Deferred[FailedUOW | None]:
        """
        The entry of C{uowId} as the bucket has it now, not as the mirror
        last heard (which another instance's write may not have reached).
        """
        return aio(self._fresh(uowId))

    async def _fresh(self, uowId: int) -> FailedUOW | None:
        current = await self._current(uowId)
        if current is None:
            return None
        self._entries[uowId] = current
        return current[0]

    async def _current(self, uowId: int) -> tuple[FailedUOW, int] | None:
        """
        The entry of C{uowId} in the bucket and its revision, if there is
        one; the mirror forgets one that is gone.
        """
        from nats.js.errors import NotFoundError  # a key never written, or deleted

        try:
            current = await self.link.buckets["failed"].get(f"u{uowId}")
        except NotFoundError:
            current = None
        if current is None or not current.value:
            self._entries.pop(uowId, None)
            return None
        return FailedUOW.fromJSON(json.loads(current.value)), current.revision

    def list(self, state: Status | None = None) -> builtins.list[FailedUOW]:
        return [
            self._entries[uowId][0]
            for uowId in sorted(self._entries)
            if state is None or self._entries[uowId][0].state is state
        ]

    def _leaseOver(self, entry: FailedUOW, now: float) -> bool:
        return entry.nextAttemptAt is not None and entry.nextAttemptAt <= now

    def markRetrying(self, uowId: int) -> Deferred[FailedUOW | None]:
        def free(entry: FailedUOW, now: float) -> bool:
            return entry.state is not Status.retrying or self._leaseOver(entry, now)

        return aio(self._take(uowId, free))

    async def _take(self, uowId: int, takeable: Callable[[FailedUOW, float], bool]) -> FailedUOW | None:
        """
        Take C{uowId}'s entry for an attempt, if C{takeable} says so of its
        newest revision and no other instance takes it first.
        """
        from nats.js.errors import KeyWrongLastSequenceError

        bucket = self.link.buckets["failed"]
        current = await self._current(uowId)
        if current is None:
            return None
        entry, revision = current
        now = self._clock.seconds()
        if not takeable(entry, now):
            self._entries[uowId] = current
            return None
        taken = evolve(entry, state=Status.retrying, nextAttemptAt=now + self.lease)
        try:
            revision = await bucket.update(f"u{uowId}", _entryJSON(taken), last=revision)
        except KeyWrongLastSequenceError:
            return None  # another instance took it
        self._entries[uowId] = (taken, revision)
        self._taken[uowId] = revision
        return taken

    def takeDue(self) -> Deferred[builtins.list[FailedUOW]]:
        return aio(self._takeDue())

    async def _takeDue(self) -> builtins.list[FailedUOW]:
        now = self._clock.seconds()

        def due(entry: FailedUOW, now: float) -> bool:
            return entry.state in (Status.queued, Status.retrying) and self._leaseOver(entry, now)

        taken = []
        for entry in self.list():
            if due(entry, now):
                got = await self._take(entry.uow, due)
                if got is not None:
                    if entry.state is Status.retrying:
                        self.log.warn("UOW {uow}: its attempt's lease ran out; taken again", uow=entry.uow)
                    taken.append(got)
        return taken

    def drop(self, uowId: int) -> Deferred[FailedUOW | None]:
        return aio(self._drop(uowId))

    async def _drop(self, uowId: int) -> FailedUOW | None:
        """
        Delete the entry, unless another instance takes it for an attempt
        first (a compare-and-set on the revision read).

        @raise Taken: It is under way elsewhere.
        """
        from nats.js.errors import KeyWrongLastSequenceError

        current = await self._current(uowId)
        if current is None:
            return None
        entry, revision = current
        if self._taken.get(uowId) != revision:
            if entry.state is Status.retrying and not self._leaseOver(entry, self._clock.seconds()):
                raise Taken(uowId)
        try:
            await self.link.buckets["failed"].delete(f"u{uowId}", last=revision)
        except KeyWrongLastSequenceError:
            raise Taken(uowId)
        self._entries.pop(uowId, None)
        self._taken.pop(uowId, None)
        return entry

    def __len__(self) -> int:
        return len(self._entries)


def _entryJSON(entry: FailedUOW) -> bytes:
    return json.dumps(entry.asJSON()).encode("utf-8")
