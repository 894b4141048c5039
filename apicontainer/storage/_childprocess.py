"""
A helper process of the server, and the calls it answers.

The server runs some of its blocking work in child processes of its own
(the C{filesystem} stash, the journal of spool writes and final states):
with no thread beside it, a child's system calls wait for no other thread
to give up Python's GIL, and none of its work is done by the server's
process.

They talk over the child's standard input and output in the frames of
L{apicontainer.storage._childprotocol}.

When a child ends (killed, or out of memory), every call under way fails
with L{OSError}, and the next call starts a new child.
"""

from __future__ import annotations

import fcntl
import os
import select
import signal
import sys
from collections import deque
from pathlib import Path
from typing import Any, Callable, Sequence

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from .. import _crashpoints as crashpoints
from ._childprotocol import Answer, frame, frames, manyAnswer, refusal, refused

Outcome = tuple[bool, Any]
from ._durable import makeDirectories, writeAll


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


def runOutcomes(runBatch: Callable[[Sequence[Any]], list[Outcome]], operations: Sequence[Any]) -> list[Outcome]:
    """
    The outcome of each of C{operations} run as one batch (a group commit's
    C{runBatch}): the batch's failure for each, if the whole batch failed.
    """
    if not operations:
        return []
    try:
        return runBatch(operations)
    except Exception:
        return [(False, Failure())] * len(operations)


class CallBatch:
    """
    The operations of the calls that a child runs as one batch, and the
    answers they make: a call's one operation gives its answer; a batch
    call's many give one answer with an outcome for each (L{manyAnswer}).

    @param answers: The answers of all the calls that arrived together, in
        order; each call added here takes its place there.
    """

    def __init__(self, answers: list[bytes]) -> None:
        self._answers = answers
        self._operations: list[Any] = []
        self._owners: list[tuple[int, int, bool]] = []

    def add(self, operations: Sequence[Any], many: bool = False) -> None:
        """
        Add the operations of the next call, a batch call if C{many}.
        """
        self._owners.append((len(self._answers), len(operations), many))
        self._operations.extend(operations)
        self._answers.append(b"")

    def run(
        self,
        runBatch: Callable[[Sequence[Any]], list[Outcome]],
        one: Callable[[Any], bytes],
        each: Callable[[Any], Any],
    ) -> None:
        """
        Run the operations added as one batch, and put each call's answer in
        its place: C{one(value)} for a call, C{manyAnswer} with C{each} for
        a batch call, or the refusal.
        """
        outcomes = runOutcomes(runBatch, self._operations)
        start = 0
        for index, count, many in self._owners:
            theirs = outcomes[start : start + count]
            start += count
            if many:
                self._answers[index] = manyAnswer(theirs, each)
            else:
                ((ok, value),) = theirs
                self._answers[index] = one(value) if ok else refusal(value)
        self._operations, self._owners = [], []


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
