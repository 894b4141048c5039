"""
The C{filesystem} stash in a process of its own (C{process: true}).

The server hands the stash's calls to a child process, C{python -m
apicontainer.stashes.fsprocess NAME ROOT}, which runs an ordinary
L{FilesystemStash} on C{ROOT}. The child runs the calls that reach it while
it was busy as one batch (group commit: one C{syncfs} for them all), with no
thread beside it: its system calls wait for no other thread to give up
Python's GIL, and none of its work is done by the server's process.

They talk over the child's standard input and output, a frame per call and
per answer, in the order of the calls::

    length      4 bytes   big-endian uint32: what follows
    head size   4 bytes   big-endian uint32
    head        n bytes   UTF-8 JSON: the call (or the answer)
    body        the rest  a UOW's body (or a document's), when inline

A body too large to hold (a L{SpooledBody}) is not copied: the child reads it
from the spool file, as a stash in the server does.

When the child ends (killed, or out of memory), every call under way fails
with L{OSError}, which the stash reports as a 503: the UOW is rolled back and
retried. The next call starts a new child, which reads the stash's undo
records and rolled-back markers back from disk, as a restarted server does.
The stashes of one server on one root (the old and the new one while a
reload hands over) share one child, so that one index of the undo records
serves them all; it ends when the last of them stops. A child holds an
exclusive lock on C{ROOT/.lock} for its whole life, so that the child of
another server (one restarted after a crash) waits for the last one to
finish its batch.
"""

from __future__ import annotations

import builtins
import fcntl
import json
import os
import struct
import sys
from collections import deque
from pathlib import Path
from typing import Any, Callable, Iterator

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from ..compactjson import compact
from ..interfaces import IProbe, IReader, IStartable, IStash
from ..uow import Document, SpooledBody, UnitOfWork, Verdict
from . import unavailable

_SIZES = struct.Struct(">II")


def frame(head: dict[str, Any], body: bytes = b"") -> bytes:
    """
    One call or answer, framed.
    """
    encoded = compact(head).encode("utf-8")
    return _SIZES.pack(4 + len(encoded) + len(body), len(encoded)) + encoded + body


def frames(buffer: bytearray) -> Iterator[tuple[dict[str, Any], bytes]]:
    """
    Take every whole frame off the front of C{buffer}, as (head, body).
    """
    while len(buffer) >= 8:
        length, headSize = _SIZES.unpack_from(buffer)
        if len(buffer) < 4 + length:
            return
        head = json.loads(bytes(buffer[8 : 8 + headSize]))
        body = bytes(buffer[8 + headSize : 4 + length])
        del buffer[: 4 + length]
        yield head, body


def encodeUOW(uow: UnitOfWork) -> tuple[dict[str, Any], bytes]:
    """
    What the stash needs of C{uow}, as a frame's head and body.
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
    body = uow._body
    if isinstance(body, SpooledBody) and isinstance(body.source, Path):
        head["spooled"] = [str(body.source), body.offset, body.length]
        return head, b""
    return head, uow.body


def decodeUOW(head: dict[str, Any], body: bytes) -> UnitOfWork:
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
    )


# The child.


def _answer(result: Any) -> bytes:
    if isinstance(result, Verdict):
        return frame({"ok": True, "verdict": result.asJSON()})
    if isinstance(result, Document):
        return frame({"ok": True, "type": result.contentType, "uow": result.uow}, result.body)
    return frame({"ok": True, "none": result is None})


def _refusal(reason: Failure) -> bytes:
    error = reason.value
    return frame({"ok": False, "error": str(error) or type(error).__name__, "type": type(error).__name__})


def serve(stash: Any, read: Callable[[], bytes], write: Callable[[bytes], None]) -> None:
    """
    Answer calls for C{stash} (a L{FilesystemStash}, opened) until C{read}
    gives C{b""}: every call that has arrived goes in one batch, and the
    answers of a batch are written at once.
    """
    buffer = bytearray()
    while True:
        data = read()
        if not data:
            return
        buffer += data
        calls = list(frames(buffer))
        if not calls:
            continue
        answers = []
        operations = []
        for head, body in calls:
            op = head["op"]
            if op in ("stash", "commit", "rollback"):
                operations.append((getattr(stash, "_" + op), (decodeUOW(head["uow"], body),)))
                continue
            answers.extend(_run(stash, operations))
            operations = []
            answers.append(_single(stash, op, head, body))
        answers.extend(_run(stash, operations))
        write(b"".join(answers))


def _run(stash: Any, operations: list[Any]) -> list[bytes]:
    if not operations:
        return []
    try:
        outcomes = stash._runBatch(operations)
    except Exception:
        return [_refusal(Failure())] * len(operations)
    return [_answer(value) if ok else _refusal(value) for ok, value in outcomes]


def _single(stash: Any, op: str, head: dict[str, Any], body: bytes) -> bytes:
    try:
        if op == "read":
            return _answer(stash._read(head["key"]))
        if op == "probe":
            return _answer(stash._check())
        raise ValueError(f"unknown call {op!r}")
    except Exception:
        return _refusal(Failure())


def main(argv: list[str]) -> None:
    from ..blocking import inline
    from ..durable import makeDirectories
    from .filesystem import FilesystemStash

    name, root = argv
    stash = FilesystemStash(name, Path(root), inline)

    def write(data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(1, view) :]

    try:
        makeDirectories(Path(root))
        lock = os.open(os.path.join(root, ".lock"), os.O_RDWR | os.O_CREAT, 0o640)
        fcntl.flock(lock, fcntl.LOCK_EX)  # held until this process ends
        stash._open()
    except Exception:
        write(_refusal(Failure()))
        return
    write(frame({"ok": True, "none": True}))
    serve(stash, lambda: os.read(0, 1 << 20), write)


# The server's side.

_STOP_SECONDS = 10.0


class _Child(ProcessProtocol):
    """
    One child process: its calls under way, answered in the order made.
    """

    def __init__(self, runner: _Runner) -> None:
        self._runner = runner
        self._buffer = bytearray()
        self.pending: deque[Deferred[Any]] = deque()
        self.ended = False

    def call(self, head: dict[str, Any], body: bytes = b"") -> Deferred[Any]:
        self.transport.write(frame(head, body))  # type: ignore[union-attr]
        return self.answer()

    def answer(self) -> Deferred[Any]:
        """
        The next answer: L{_result} of it.
        """
        answer: Deferred[Any] = Deferred()
        self.pending.append(answer)
        return answer

    def childDataReceived(self, fd: int, data: bytes) -> None:
        if fd == 2:
            for line in data.decode("utf-8", "replace").splitlines():
                self._runner.log.warn("filesystem stash {stash}: {line}", stash=self._runner.name, line=line)
            return
        self._buffer += data
        for head, body in frames(self._buffer):
            # One given up on (cancelled by a timeout) ignores its answer.
            answer = self.pending.popleft()
            try:
                result = _result(head, body)
            except Exception:
                answer.errback()
            else:
                answer.callback(result)

    def processEnded(self, reason: Failure) -> None:
        self.ended = True
        pending, self.pending = self.pending, deque()
        for answer in pending:
            answer.errback(OSError(f"the process of filesystem stash {self._runner.name} ended: {reason.value}"))
        self._runner.ended(self, reason)


def _result(head: dict[str, Any], body: bytes) -> Any:
    if not head["ok"]:
        # The child's OSError as its built-in kind (NotADirectoryError, ...).
        kind = getattr(builtins, head["type"], None)
        if not (isinstance(kind, type) and issubclass(kind, OSError)):
            kind = RuntimeError
        raise kind(head["error"])
    if "verdict" in head:
        return Verdict.fromJSON(head["verdict"])
    if "uow" in head:
        return Document(body, head["type"], head["uow"])
    return None


class _Runner:
    """
    The child process of one root, shared by every stash of this server on
    that root (the old and the new one while a reload hands over), so that
    one in-memory index of its undo records serves them all. It runs while
    one of them is started: a call with none starts a child if there is
    none, and the last one to stop ends it.
    """

    log = Logger()

    def __init__(self, name: str, root: Path, reactor: Any) -> None:
        self.name = name
        self.root = root
        self._reactor = reactor
        self.users = 0
        self._child: _Child | None = None
        # While a child starts: who waits for it.
        self._starting: list[Deferred[None]] | None = None
        self._stopped: list[Deferred[None]] = []
        self._kill: Any = None

    def ready(self) -> Deferred[None]:
        """
        A Deferred that fires once a child runs and has read the stash's
        state back: a new child if there is none.
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
                child,
                sys.executable,
                [sys.executable, "-m", "apicontainer.stashes.fsprocess", self.name, str(self.root)],
                env=os.environ,
                childFDs={0: "w", 1: "r", 2: "r"},
            )
        except OSError:
            return fail()
        self._child = child
        return child.answer()  # its first answer: it has opened the stash

    def call(self, head: dict[str, Any], body: bytes = b"") -> Deferred[Any]:
        child = self._child
        if child is not None and not child.ended and self._starting is None:
            return child.call(head, body)

        def call(_: object) -> Deferred[Any]:
            if self._child is None or self._child.ended:
                raise OSError(f"the process of filesystem stash {self.name} has ended")
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
            self.log.warn("the process of filesystem stash {stash} ended: {reason}", stash=self.name, reason=reason.value)
        for waiter in stopped:
            waiter.callback(None)


# The runner of each root that a stash of this server has started.
_runners: dict[Path, _Runner] = {}


@implementer(IStash, IReader, IStartable, IProbe)
class FilesystemProcessStash:
    """
    A L{FilesystemStash} run by a child process: the server's side.
    """

    def __init__(self, name: str, root: Path, reactor: Any) -> None:
        self.name = name
        self.root = root
        self._reactor = reactor
        self._runner: _Runner | None = None

    def start(self) -> Deferred[None]:
        if self._runner is None:
            runner = _runners.get(self.root)
            if runner is None:
                runner = _runners[self.root] = _Runner(self.name, self.root, self._reactor)
            runner.users += 1
            self._runner = runner
        return self._runner.ready()

    def stop(self) -> Deferred[None]:
        runner, self._runner = self._runner, None
        if runner is None:
            return succeed(None)
        runner.users -= 1
        if runner.users:
            return succeed(None)
        del _runners[self.root]
        return runner.stop()

    def _call(self, head: dict[str, Any], body: bytes = b"") -> Deferred[Any]:
        if self._runner is None:
            return fail(OSError(f"filesystem stash {self.name} is not started"))
        return self._runner.call(head, body)

    def _uowCall(self, op: str, uow: UnitOfWork) -> Deferred[Any]:
        head, body = encodeUOW(uow)
        return self._call({"op": op, "uow": head}, body)

    def stash(self, uow: UnitOfWork) -> Deferred[Verdict]:
        return self._uowCall("stash", uow).addErrback(unavailable(self, uow, OSError))

    def commit(self, uow: UnitOfWork) -> Deferred[None]:
        return self._uowCall("commit", uow)

    def rollback(self, uow: UnitOfWork) -> Deferred[None]:
        return self._uowCall("rollback", uow)

    def read(self, key: str) -> Deferred[Document | None]:
        return self._call({"op": "read", "key": key})

    def probe(self) -> Deferred[None]:
        return self._call({"op": "probe"})


if __name__ == "__main__":
    main(sys.argv[1:])
