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
import json
import time
import uuid
import zlib
from typing import Any, Awaitable, Callable, Coroutine, TypeVar

from attrs import frozen
from twisted.internet.defer import CancelledError, Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from ._spool import SpoolError

T = TypeVar("T")

# Headers of a UOW's message.
DEDUP = "Nats-Msg-Id"
# Where the instance that took the request hears the UOW's report.
REPLY = "Apicontainer-Reply"
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
    # Of idempotency records and final states.
    retention: float = 86400.0
    # The stream's own Idempotency-Key dedup: min(this, retention).
    duplicateWindow: float = 600.0

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
    @ivar inbox: The subject on which this instance hears the reports of the
        UOWs it published.
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
        self.onReconnected: list[Callable[[], None]] = []
        self.inbox = f"_apicontainer.{settings.stream}.verdict.{uuid.uuid4().hex}"

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
            for hook in self.onReconnected:
                hook()

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
        for stream in (self.settings.stream, *(f"KV_{self.settings.bucket(what)}" for what in self.buckets)):
            await self._led(stream)
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

    async def _led(self, stream: str, timeout: float = 30.0) -> None:
        """
        Wait until C{stream} has a leader: one just created takes a moment
        to elect it, and answers nothing meanwhile.
        """
        deadline = asyncio.get_event_loop().time() + timeout
        while True:
            try:
                info = await self.js.stream_info(stream)
                if info.cluster is None or info.cluster.leader:
                    return
            except Exception:
                pass
            if asyncio.get_event_loop().time() > deadline:
                return  # the writes say what is wrong
            await asyncio.sleep(0.1)

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

    async def deleteMessage(self, sequence: int) -> None:
        """
        Delete the message C{sequence} from the stream, if it is there,
        without overwriting its bytes (a secure erase cost more than the
        rest of a UOW); they go when JetStream compacts its block.
        """
        from nats.js.errors import APIError

        answer = await self.nc.request(
            f"$JS.API.STREAM.MSG.DELETE.{self.settings.stream}",
            json.dumps({"seq": sequence, "no_erase": True}).encode(),
            timeout=self.settings.ackWait,
        )
        error = json.loads(answer.data).get("error")
        if error is not None and error.get("err_code") not in NO_MESSAGE:
            raise APIError.from_error(error)

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
