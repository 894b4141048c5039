"""
A helper process of the server, and the calls it answers.

The server runs some of its blocking work in child processes of its own
(the C{filesystem} stash, the journal of spool writes and final states):
with no thread beside it, a child's system calls wait for no other thread
to give up Python's GIL, and none of its work is done by the server's
process.

They talk over the child's standard input and output, a frame per call and
per answer, in the order of the calls::

    length      4 bytes   big-endian uint32: what follows
    head size   4 bytes   big-endian uint32
    head        n bytes   the call (or the answer): a dict in L{marshal}'s
                          format, which both ends read alike, being the
                          same Python, at a fraction of JSON's cost
    body        the rest  bytes that go with it (a request's body), if any

A child answers first when it is ready (or why it is not), then each call.
Every answer's head has C{ok}; a refusal has C{error} and C{type}, the name
of the exception's class.

When a child ends (killed, or out of memory), every call under way fails
with L{OSError}, and the next call starts a new child.
"""

from __future__ import annotations

import builtins
import fcntl
import marshal
import os
import select
import signal
import struct
import sys
from collections import deque
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

from attrs import frozen
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from . import crashpoints
from .durable import makeDirectories, writeAll
from .uow import SpooledBody, UnitOfWork

_SIZES = struct.Struct(">II")

Answer = tuple[dict[str, Any], bytes]


@frozen
class Command:
    """
    A call the server makes on one of its child processes. Each child's
    commands are declared once, in its module, and both ends use them: the
    server to make the call, the child to run it.

    @ivar name: What the call's head carries as C{op}.
    @ivar batched: Whether the child runs it in one batch with the calls
        that reached it together (a write), or on its own (a read).
    """

    name: str
    batched: bool = True


def frame(head: dict[str, Any], body: bytes = b"", dumps: Callable[[Any], bytes] = marshal.dumps) -> bytes:
    """
    One call or answer, framed.

    @param dumps: How the head is written (another than the default only
        to measure it: C{bench.frames}).
    """
    encoded = dumps(head)
    return _SIZES.pack(4 + len(encoded) + len(body), len(encoded)) + encoded + body


def frames(buffer: bytearray, loads: Callable[[bytearray], Any] = marshal.loads) -> Iterator[Answer]:
    """
    Take every whole frame off the front of C{buffer}, as (head, body).

    @param loads: How a head is read: L{frame}'s C{dumps} undone.
    """
    while len(buffer) >= 8:
        length, headSize = _SIZES.unpack_from(buffer)
        if len(buffer) < 4 + length:
            return
        head = loads(buffer[8 : 8 + headSize])
        body = bytes(buffer[8 + headSize : 4 + length])
        del buffer[: 4 + length]
        yield head, body


def refusal(reason: Failure) -> bytes:
    """
    The answer that a call failed with C{reason}.
    """
    error = reason.value
    return frame({"ok": False, "error": str(error) or type(error).__name__, "type": type(error).__name__})


def refused(head: dict[str, Any], kinds: Mapping[str, type[Exception]] = {}) -> Exception | None:
    """
    The error of an answer that is a refusal: of its kind in C{kinds}, or
    the child's L{OSError} as its built-in kind (C{NotADirectoryError},
    ...), or else a L{RuntimeError}; L{None} for an answer that is not.
    """
    if head["ok"]:
        return None
    kind = kinds.get(head["type"])
    if kind is None:
        builtin = getattr(builtins, head["type"], None)
        kind = builtin if isinstance(builtin, type) and issubclass(builtin, OSError) else RuntimeError
    return kind(head["error"])


def encodeUOW(uow: UnitOfWork, withBody: bool = True) -> tuple[dict[str, Any], bytes]:
    """
    C{uow} as a frame's head and body. A body too large to hold that lies
    in a file (its spool file) is not copied: the frame says where it lies.

    @param withBody: Whether the call needs the body at all: without it,
        the UOW decodes with an empty body (a commit or a rollback, which
        go by the UOW's id, key and attempt).
    """
    head: dict[str, Any] = {
        "id": uow.id,
        "method": uow.method,
        "key": uow.key,
        "route": uow.route,
        "type": uow.contentType,
        "at": uow.receivedAt,
        "attempt": uow.attempt,
    }
    if uow.idempotencyKey is not None:
        head["idempotency_key"] = uow.idempotencyKey
    body = uow._body
    if not withBody:
        return head, b""
    if isinstance(body, SpooledBody) and isinstance(body.source, Path):
        head["spooled"] = [str(body.source), body.offset, body.length]
        return head, b""
    return head, uow.body


def decodeUOW(head: dict[str, Any], body: bytes) -> UnitOfWork:
    """
    The UOW of a frame made by L{encodeUOW}.
    """
    spooled = head.get("spooled")
    return UnitOfWork(
        id=head["id"],
        method=head["method"],
        key=head["key"],
        route=head["route"],
        body=SpooledBody(Path(spooled[0]), spooled[1], spooled[2]) if spooled else body,
        contentType=head["type"],
        receivedAt=head["at"],
        attempt=head["attempt"],
        idempotencyKey=head.get("idempotency_key"),
    )


def becomeChild(lock: Path, open: Callable[[], None]) -> bool:
    """
    Make this process a helper of the server, and say to the server when
    it is ready.

    A signal to stop (an operator's Ctrl-C, which reaches the whole process
    group, or a service manager's SIGTERM to every process of the service)
    does not end it mid-batch: it finishes the calls it has and ends when
    the server closes its input, as after a crash of the server. A crash
    point reached here kills the server too.

    @param lock: A file to hold an exclusive lock on for the life of the
        process (its folder is made if need be), so that the child of
        another server (one restarted after a crash) waits until this one
        has finished its last batch.
    @param open: Called once the lock is held, to open what the child
        works on.
    @return: Whether it is ready; if not, the server has been told why.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    crashpoints.inHelper()
    try:
        makeDirectories(lock.parent)
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o640)
        fcntl.flock(fd, fcntl.LOCK_EX)  # held until this process ends
        open()
    except Exception:
        writeOut(refusal(Failure()))
        return False
    writeOut(frame({"ok": True}))
    return True


def serve(
    answer: Callable[[list[Answer]], list[bytes]],
    read: Callable[[], bytes] | None = None,
    write: Callable[[bytes], None] | None = None,
) -> None:
    """
    Answer calls until C{read} gives C{b""} (the server closed this
    process's input): the calls that have arrived go to C{answer} together,
    which gives their answers in the order of the calls, and those are
    written at once.

    @param read: By default L{readIn}.
    @param write: By default L{writeOut}.
    """
    read = read or readIn
    write = write or writeOut
    buffer = bytearray()
    while True:
        data = read()
        if not data:
            return
        buffer += data
        calls = list(frames(buffer))
        if calls:
            write(b"".join(answer(calls)))


def answerBatch(
    runBatch: Callable[[Sequence[Any]], list[tuple[bool, Any]]],
    operations: Sequence[Any],
    answer: Callable[[Any], bytes],
) -> list[bytes]:
    """
    Run C{operations} as one batch (a group commit's C{runBatch}) and give
    each one's answer: C{answer} of what it returned, or its refusal (the
    batch's, when the whole batch failed).
    """
    if not operations:
        return []
    try:
        outcomes = runBatch(operations)
    except Exception:
        return [refusal(Failure())] * len(operations)
    return [answer(value) if ok else refusal(value) for ok, value in outcomes]


def writeOut(data: bytes) -> None:
    """
    Write all of C{data} to standard output (in the child).
    """
    writeAll(1, [data])


def readIn(idle: Callable[[], bool] | None = None) -> bytes:
    """
    What has arrived on standard input, waiting for some (in the child).

    @param idle: Called while nothing has arrived, again and again until
        something has or it says it has nothing more to do: for work that
        no answer waits on.
    """
    if idle is not None:
        while not select.select([0], [], [], 0)[0] and idle():
            pass
    return os.read(0, 1 << 20)


# The server's side.

_STOP_SECONDS = 10.0


class _Child(ProcessProtocol):
    """
    One child process: its calls under way, answered in the order made.
    """

    def __init__(self, runner: ChildRunner) -> None:
        self._runner = runner
        self._buffer = bytearray()
        self.pending: deque[Deferred[Answer]] = deque()
        self.ended = False

    def call(self, head: dict[str, Any], body: bytes = b"") -> Deferred[Answer]:
        self.transport.write(frame(head, body))  # type: ignore[union-attr]
        return self.answer()

    def answer(self) -> Deferred[Answer]:
        """
        The next answer.
        """
        answer: Deferred[Answer] = Deferred()
        self.pending.append(answer)
        return answer

    def childDataReceived(self, fd: int, data: bytes) -> None:
        if fd == 2:
            for line in data.decode("utf-8", "replace").splitlines():
                self._runner.log.warn("{what}: {line}", what=self._runner.what, line=line)
            return
        self._buffer += data
        for answer in frames(self._buffer):
            # One given up on (cancelled by a timeout) ignores its answer.
            self.pending.popleft().callback(answer)

    def processEnded(self, reason: Failure) -> None:
        self.ended = True
        pending, self.pending = self.pending, deque()
        for answer in pending:
            answer.errback(OSError(f"the process of {self._runner.what} ended: {reason.value}"))
        self._runner.ended(self, reason)


def _ready(answer: Answer) -> None:
    error = refused(answer[0])
    if error is not None:
        raise error


class ChildRunner:
    """
    Starts a child process, C{python -m MODULE ARGS...}, when the first call
    needs it (or a new one, after it ended), sends it calls, and stops it.

    @ivar users: How many users share it (for its owner to count).
    """

    log = Logger()

    def __init__(self, what: str, module: str, args: list[str], reactor: Any) -> None:
        """
        @param what: What the child runs, for the log ("filesystem stash
            files").
        """
        self.what = what
        self._argv = [sys.executable, "-m", module, *args]
        self._reactor = reactor
        self.users = 0
        self._child: _Child | None = None
        # While a child starts: who waits for it.
        self._starting: list[Deferred[None]] | None = None
        self._stopped: list[Deferred[None]] = []
        self._kill: Any = None

    @property
    def pid(self) -> int | None:
        """
        The running child's process id, if there is one.
        """
        if self._child is None or self._child.ended:
            return None
        return self._child.transport.pid  # type: ignore[union-attr, no-any-return]

    def ready(self) -> Deferred[None]:
        """
        A Deferred that fires once a child runs and has said it is ready: a
        new child if there is none.
        """
        if self._starting is None:
            if self._child is not None and not self._child.ended:
                return succeed(None)
            waiters: list[Deferred[None]] = []
            self._starting = waiters

            def started(result: object) -> None:
                self._starting = None
                for waiter in waiters:
                    if isinstance(result, Failure):
                        waiter.errback(result)
                    else:
                        waiter.callback(None)

            self._spawn().addBoth(started)
        waiter: Deferred[None] = Deferred()
        self._starting.append(waiter)  # type: ignore[union-attr]
        return waiter

    def _spawn(self) -> Deferred[None]:
        child = _Child(self)
        try:
            self._reactor.spawnProcess(
                child, self._argv[0], self._argv, env=os.environ, childFDs={0: "w", 1: "r", 2: "r"}
            )
        except OSError:
            return fail()
        self._child = child
        return child.answer().addCallback(_ready)  # its first answer: it is ready

    def call(self, head: dict[str, Any], body: bytes = b"") -> Deferred[Answer]:
        """
        Send a call to the child, starting one if there is none.

        @return: A Deferred that fires with the answer, or fails with
            L{OSError} if the child ends first or cannot start.
        """
        child = self._child
        if child is not None and not child.ended and self._starting is None:
            return child.call(head, body)

        def call(_: object) -> Deferred[Answer]:
            if self._child is None or self._child.ended:
                raise OSError(f"the process of {self.what} has ended")
            return self._child.call(head, body)

        return self.ready().addCallback(call)

    def stop(self) -> Deferred[None]:
        """
        Let the child finish the calls it has, and end: it ends when its
        input does. One that has not ended after L{_STOP_SECONDS} is killed.
        """
        child = self._child
        if child is None or child.ended:
            return succeed(None)
        stopped: Deferred[None] = Deferred()
        self._stopped.append(stopped)
        child.transport.closeStdin()  # type: ignore[union-attr]

        def kill() -> None:
            if not child.ended:
                child.transport.signalProcess("KILL")  # type: ignore[union-attr]

        self._kill = self._reactor.callLater(_STOP_SECONDS, kill)
        return stopped

    def ended(self, child: _Child, reason: Failure) -> None:
        if self._child is child:
            self._child = None
        stopped, self._stopped = self._stopped, []
        if self._kill is not None and self._kill.active():
            self._kill.cancel()
        if not stopped:
            self.log.warn("the process of {what} ended: {reason}", what=self.what, reason=reason.value)
        for waiter in stopped:
            waiter.callback(None)
