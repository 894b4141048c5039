"""
The C{jetstream} spool: UOWs in a replicated NATS JetStream stream, shared
by every instance that names it.

A UOW is one message on C{<stream>.p<N>}, N a stable hash of its key modulo
the partitions; its UOW id is the message's stream sequence, unique and
increasing across the cluster. The publish acknowledgement, given once a
quorum of the stream's replicas holds the message, is the durability point.
The message stays in the stream until the UOW is final (the spool file of
the C{file} backend), and is deleted then.

nats-py is asyncio: the server runs on Twisted's asyncio reactor, and each
call here turns a coroutine into a Deferred (L{aio}).
"""

from __future__ import annotations

import asyncio
import time
import zlib
from pathlib import Path
from typing import Any, Awaitable, Callable, Coroutine, TypeVar

from attrs import evolve, field, frozen
from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from ..interfaces import IJournal, ISpool
from ..uow import UnitOfWork
from ._durable import makeDirectories, writeFile
from ._spool import SpoolError
from ._spoolfile import decode, encode

T = TypeVar("T")

# Headers of a UOW's message.
DEDUP = "Nats-Msg-Id"
PAYLOAD_HASH = "Apicontainer-Payload-Hash"
# JetStream's error codes for a sequence with no message (to read, to delete).
NO_MESSAGE = (10037, 10057)


class SpoolUnavailable(SpoolError):
    """
    The stream did not acknowledge the UOW (no quorum, or no connection):
    nothing was spooled. Retry later.
    """


class SpoolTooLarge(SpoolError):
    """
    The UOW is larger than the server's largest message.
    """

    def __init__(self, limit: int) -> None:
        super().__init__(f"the request is larger than the JetStream server's max_payload of {limit} bytes")
        self.limit = limit


class StreamMismatch(Exception):
    """
    The stream exists with settings that differ from the configuration's.
    """


@frozen
class JetStreamSettings:
    """
    The C{spool} section for C{backend: jetstream}.
    """

    servers: tuple[str, ...]
    stream: str = "APICONTAINER"
    partitions: int = 64
    replicas: int = 3
    ackWait: float = 10.0
    # Of idempotency records and final states; also the stream's
    # duplicate window is min(this, DUPLICATE_WINDOW).
    retention: float = 86400.0
    duplicateWindow: float = field(default=600.0)

    def subject(self, partition: int) -> str:
        return f"{self.stream}.p{partition}"

    def partitionOf(self, key: str) -> int:
        """
        The partition of C{key}: the same on every instance and every run.
        """
        return zlib.crc32(key.encode("utf-8")) % self.partitions

    def bucket(self, what: str) -> str:
        return f"{self.stream}-{what}"


def aio(coroutine: Coroutine[Any, Any, T]) -> Deferred[T]:
    """
    Run C{coroutine} on the asyncio loop the reactor runs on. Cancelling the
    Deferred cancels it, and fails the Deferred with Twisted's
    C{CancelledError}, as every other Deferred (a timeout looks for it).
    """

    def cancelled(failure: Failure) -> Failure:
        if failure.check(asyncio.CancelledError):
            return Failure(CancelledError())
        return failure

    return Deferred.fromFuture(asyncio.ensure_future(coroutine)).addErrback(cancelled)


class JetStreamLink:
    """
    The connection to the cluster, and the stream and buckets it needs,
    created when missing and checked when present.

    @ivar connected: Whether the connection is up now.
    @ivar lastSequence: The highest stream sequence seen (a UOW id).
    """

    log = Logger()

    def __init__(self, settings: JetStreamSettings, name: str = "apicontainer") -> None:
        self.settings = settings
        self.name = name
        self.nc: Any = None
        self.js: Any = None
        self.buckets: dict[str, Any] = {}
        self.lastSequence = 0
        self.created = ""
        self.publishLatency: Callable[[float], None] = lambda seconds: None
        self.onConnected: list[Callable[[], Awaitable[None]]] = []

    @property
    def connected(self) -> bool:
        return self.nc is not None and self.nc.is_connected

    @property
    def maxPayload(self) -> int:
        return int(self.nc.max_payload) if self.nc is not None else 1024 * 1024

    async def connect(self, retryEvery: float = 2.0) -> None:
        """
        Connect, retrying until the cluster answers; then check or create
        the stream and the buckets.

        @raise StreamMismatch: The stream's settings differ from ours.
        """
        import nats
        from nats.errors import NoServersError

        async def disconnected() -> None:
            self.log.error("JetStream: disconnected from {servers}", servers=",".join(self.settings.servers))

        async def reconnected() -> None:
            self.log.info("JetStream: reconnected to {url}", url=str(self.nc.connected_url.netloc))

        async def failed(e: Exception) -> None:
            self.log.debug("JetStream: {error}", error=str(e) or type(e).__name__)

        warned = False
        while True:
            try:
                self.nc = await nats.connect(
                    list(self.settings.servers),
                    name=self.name,
                    max_reconnect_attempts=-1,
                    reconnect_time_wait=0.5,
                    connect_timeout=2,
                    disconnected_cb=disconnected,
                    reconnected_cb=reconnected,
                    error_cb=failed,
                )
                break
            except (NoServersError, OSError, asyncio.TimeoutError) as e:
                if not warned:
                    self.log.error(
                        "JetStream: cannot reach {servers} ({error}); retrying every {every}s",
                        servers=",".join(self.settings.servers),
                        error=str(e) or type(e).__name__,
                        every=retryEvery,
                    )
                    warned = True
                await asyncio.sleep(retryEvery)
        self.js = self.nc.jetstream(timeout=max(5.0, self.settings.ackWait / 2))
        await self._ensureStream()
        for what in ("states", "last", "idempotency", "failed"):
            self.buckets[what] = await self._ensureBucket(what)
        for hook in self.onConnected:
            await hook()

    async def _ensureStream(self) -> None:
        from nats.js.api import StorageType, StreamConfig
        from nats.js.errors import NotFoundError

        s = self.settings
        try:
            info = await self.js.stream_info(s.stream)
        except NotFoundError:
            info = await self.js.add_stream(
                StreamConfig(
                    name=s.stream,
                    subjects=[f"{s.stream}.>"],
                    num_replicas=s.replicas,
                    storage=StorageType.FILE,
                    duplicate_window=min(s.duplicateWindow, s.retention),
                    metadata={"apicontainer.partitions": str(s.partitions)},
                )
            )
            self.log.info(
                "JetStream: created stream {stream}: {partitions} partitions, {replicas} replica(s)",
                stream=s.stream,
                partitions=s.partitions,
                replicas=s.replicas,
            )
        partitions = (info.config.metadata or {}).get("apicontainer.partitions")
        if partitions != str(s.partitions):
            raise StreamMismatch(
                f"spool.partitions: {s.partitions}, but stream {s.stream} was created with"
                f" {partitions or 'no'} partitions; they are fixed once the stream exists"
            )
        if info.config.num_replicas != s.replicas:
            raise StreamMismatch(
                f"spool.replicas: {s.replicas}, but stream {s.stream} has {info.config.num_replicas}"
            )
        self.created = str(info.created)
        self.lastSequence = max(self.lastSequence, info.state.last_seq)

    async def _ensureBucket(self, what: str) -> Any:
        from nats.js.errors import BucketNotFoundError

        s = self.settings
        try:
            return await self.js.key_value(s.bucket(what))
        except BucketNotFoundError:
            # The fail queue is kept until an operator or the retry engine
            # ends an entry; the rest for the idempotency retention.
            return await self.js.create_key_value(
                bucket=s.bucket(what),
                history=1,
                replicas=s.replicas,
                ttl=None if what == "failed" else s.retention,
            )

    async def close(self) -> None:
        if self.nc is not None:
            nc, self.nc = self.nc, None
            await nc.close()

    @property
    def numbering(self) -> str:
        """
        The name of the UOW numbering: the stream's, as created.
        """
        return f"jetstream:{self.settings.stream}:{self.created}"

    async def publish(self, subject: str, data: bytes, headers: dict[str, str] | None = None) -> Any:
        """
        Publish C{data} and wait for the stream's acknowledgement.

        @raise SpoolUnavailable: No acknowledgement came.
        """
        if not self.connected:
            raise SpoolUnavailable("JetStream is unreachable; nothing was spooled")
        started = time.perf_counter()
        try:
            ack = await self.js.publish(subject, data, headers=headers, timeout=self.settings.ackWait)
        except Exception as e:
            raise SpoolUnavailable(f"JetStream did not acknowledge the write: {str(e) or type(e).__name__}")
        self.publishLatency(time.perf_counter() - started)
        self.lastSequence = max(self.lastSequence, ack.seq)
        return ack


@implementer(ISpool)
class StreamSpool:
    """
    L{apicontainer.interfaces.ISpool} on the stream: a UOW's message is its
    spool file.

    @ivar directory: The data directory, which holds only what was
        quarantined.
    """

    log = Logger()

    def __init__(self, link: JetStreamLink, dataDir: Path) -> None:
        self.link = link
        self.directory = dataDir
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

    async def _delete(self, uowId: int) -> None:
        from nats.js.errors import APIError

        try:
            await self.link.js.delete_msg(self.link.settings.stream, uowId)
        except APIError as e:
            if e.err_code not in NO_MESSAGE:
                raise

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
        headers = {}
        if uow.idempotencyKey is not None:
            headers[DEDUP] = uow.idempotencyKey
            headers[PAYLOAD_HASH] = uow.payloadHash()
        subject = self.link.settings.subject(self.link.settings.partitionOf(uow.key))
        ack = await self.link.publish(subject, data, headers or None)
        written = evolve(uow, id=ack.seq, attempt=ack.seq)
        if ack.duplicate:
            raise Duplicate(written)
        return written

    def settle(self, record: Any, removeSpool: bool) -> Deferred[Exception | None]:
        return aio(self._settle(record, removeSpool))

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
    retry's attempt is a message published and deleted at once.
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
            await self.link.js.delete_msg(s.stream, ack.seq)
        except Exception:
            pass  # an empty message that no consumer reads; it does no harm
        return int(ack.seq)
