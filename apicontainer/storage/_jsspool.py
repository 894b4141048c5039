"""
The C{jetstream} spool's parts behind the pipeline's interfaces: the spool
(a UOW's message is its spool file), the journal (a write is a publish, a
settlement a final state in the buckets and the message's deletion), and
attempt ids from the stream's sequence.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any, Sequence

from attrs import evolve
from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from ..interfaces import IJournal, ISpool
from ..uow import UnitOfWork
from ._durable import makeDirectories, writeFile
from ._jetstream import DEDUP, NO_MESSAGE, REPLY, JetStreamLink, SpoolTooLarge, aio
from ._journal import settleEach
from ._spoolfile import decode, encode


@implementer(ISpool)
class StreamSpool:
    """
    L{apicontainer.interfaces.ISpool} on the stream: a UOW's message is its
    spool file.

    @ivar directory: The data directory, which holds only what was
        quarantined.
    @ivar undeleted: UOWs whose message could not be deleted: each later
        deletion tries them again.
    """

    log = Logger()

    def __init__(self, link: JetStreamLink, dataDir: Path) -> None:
        self.link = link
        self.directory = dataDir
        self.undeleted: set[int] = set()
        self._quarantine = dataDir / "quarantine"

    def open(self) -> None:
        makeDirectories(self.directory)

    def scan(self) -> Deferred[list[int]]:
        # Nothing to scan: the partitions' consumers deliver again what no
        # instance finished.
        return succeed([])

    def load(self, uowId: int) -> Deferred[UnitOfWork]:
        return aio(self._load(uowId))

    async def _load(self, uowId: int) -> UnitOfWork:
        from nats.js.errors import APIError

        try:
            message = await self.link.js.get_msg(self.link.settings.stream, uowId)
        except APIError as e:
            if e.err_code not in NO_MESSAGE and e.code != 404:
                raise
            raise FileNotFoundError(f"UOW {uowId} is not in stream {self.link.settings.stream}")
        return uowOf(message.data, uowId)

    def delete(self, uowId: int) -> Deferred[None]:
        return aio(self._delete(uowId))

    async def _delete(self, uowId: int, tries: tuple[float, ...] = (0.2, 1.0)) -> None:
        for wait in (*tries, None):
            try:
                await self.link.deleteMessage(uowId)
                break
            except Exception:
                if wait is None:
                    self.undeleted.add(uowId)
                    raise
                await asyncio.sleep(wait)
        self.undeleted.discard(uowId)
        for left in list(self.undeleted)[:8]:
            try:
                await self.link.deleteMessage(left)
            except Exception:
                return
            self.undeleted.discard(left)

    def quarantine(self, uowId: int) -> Deferred[None]:
        return aio(self._quarantineMessage(uowId))

    async def _quarantineMessage(self, uowId: int) -> None:
        message = await self.link.js.get_msg(self.link.settings.stream, uowId)
        makeDirectories(self._quarantine)
        writeFile(self._quarantine / f"{uowId:020d}.uow", [message.data])
        await self._delete(uowId)
        self.log.error("UOW {uow}'s message is corrupt: moved to {path}", uow=uowId, path=str(self._quarantine))


def uowOf(data: bytes, uowId: int) -> UnitOfWork:
    """
    The UOW of a message whose stream sequence is C{uowId}.

    @raise CorruptSpoolFile: The message is not a UOW.
    """
    uow = decode(data)
    return evolve(uow, id=uowId, attempt=uowId)


@implementer(IJournal)
class StreamJournal:
    """
    L{apicontainer.interfaces.IJournal} on the stream: a write is a publish,
    which gives the UOW its id; a settlement records the final state in the
    shared state buckets, then deletes the message.
    """

    def __init__(self, link: JetStreamLink, spool: StreamSpool, states: Any) -> None:
        self.link = link
        self._spool = spool
        self._states = states

    def start(self) -> Deferred[None]:
        return aio(self.link.connect())

    def stop(self) -> Deferred[None]:
        return aio(self.link.close())

    def write(self, uow: UnitOfWork) -> Deferred[UnitOfWork]:
        return aio(self._write(uow))

    async def _write(self, uow: UnitOfWork) -> UnitOfWork:
        data = b"".join(encode(uow))
        if len(data) + 512 > self.link.maxPayload:
            raise SpoolTooLarge(self.link.maxPayload - 512 - (len(data) - uow.bodyLength))
        headers = {REPLY: self.link.inbox}
        if uow.idempotencyKey is not None:
            headers[DEDUP] = uow.idempotencyKey
        subject = self.link.settings.subject(self.link.settings.partitionOf(uow.key))
        ack = await self.link.publish(subject, data, headers)
        written = evolve(uow, id=ack.seq, attempt=ack.seq)
        if ack.duplicate:
            raise Duplicate(written)
        return written

    def settle(self, record: Any, removeSpool: bool) -> Deferred[Exception | None]:
        return aio(self._settle(record, removeSpool))

    def settleBatch(self, records: Sequence[Any]) -> Deferred[list[Exception | Failure | None]]:
        return settleEach(self, records)

    async def _settle(self, record: Any, removeSpool: bool) -> Exception | None:
        await self._states.put(record)
        if removeSpool:
            try:
                await self._spool._delete(record.uow)
            except Exception as e:
                return e
        return None


class Duplicate(Exception):
    """
    The stream already holds a UOW with this C{Idempotency-Key} (within its
    duplicate window): nothing new was spooled.

    @ivar uow: The request under the first UOW's id.
    """

    def __init__(self, uow: UnitOfWork) -> None:
        super().__init__(f"UOW {uow.id} has this Idempotency-Key")
        self.uow = uow


class StreamIds:
    """
    Attempt ids from the stream's sequence, so that every attempt id is
    greater than every UOW id and attempt id before it, cluster-wide: a
    retry's attempt is an empty message on C{STREAM.attempt}, which no
    consumer reads, purged at once (with any that an earlier purge missed).
    """

    def __init__(self, link: JetStreamLink) -> None:
        self.link = link

    def open(self) -> None:
        pass

    @property
    def first(self) -> int:
        """
        Greater than every id given out so far, as this instance knows.
        """
        return self.link.lastSequence + 1

    def allocate(self) -> Deferred[int]:
        return aio(self._allocate())

    async def _allocate(self) -> int:
        s = self.link.settings
        ack = await self.link.publish(f"{s.stream}.attempt", b"")
        try:
            await self.link.js.purge_stream(s.stream, subject=f"{s.stream}.attempt")
        except Exception:
            pass  # the next attempt's purge takes it
        return int(ack.seq)
