"""
The C{filesystem} stash in a process of its own (C{process: true}).

The server hands the stash's calls to a child process, C{python -m
apicontainer.stashes.fsprocess NAME ROOT}, which runs an ordinary
L{FilesystemStash} on C{ROOT}. The child runs the calls that reach it while
it was busy as one batch (group commit: one C{syncfs} for them all), with no
thread beside it: its system calls wait for no other thread to give up
Python's GIL, and none of its work is done by the server's process.

Calls and answers go over the child's standard input and output, framed as
L{apicontainer.childprocess} says: a frame's body is a UOW's body (or a
document's), when inline.

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

import sys
from functools import partial
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred, fail, succeed
from twisted.python.failure import Failure
from zope.interface import implementer

from ..childprocess import (
    Answer,
    ChildRunner,
    answerBatch,
    becomeChild,
    decodeUOW,
    encodeUOW,
    frame,
    readIn,
    refusal,
    refused,
    serve,
)
from ..interfaces import ILocalStorage, IProbe, IPrunable, IReader, IStartable, IStash
from ..uow import Document, UnitOfWork, Verdict
from . import unavailable
from .filesystem import LocalRoot


# The child.


def _answer(result: Any) -> bytes:
    if isinstance(result, Verdict):
        return frame({"ok": True, "verdict": result.asJSON()})
    if isinstance(result, Document):
        return frame({"ok": True, "type": result.contentType, "uow": result.uow}, result.body)
    if isinstance(result, int):
        return frame({"ok": True, "count": result})
    return frame({"ok": True, "none": result is None})


def _answers(stash: Any, calls: list[Answer]) -> list[bytes]:
    """
    The answers of C{calls} to C{stash} (a L{FilesystemStash}, opened):
    its writes, commits and rollbacks go in one batch, up to each read or
    probe, which is answered between them.
    """
    answers: list[bytes] = []
    operations: list[Any] = []
    for head, body in calls:
        op = head["op"]
        if op in ("stash", "commit", "rollback"):
            operations.append((getattr(stash, "_" + op), (decodeUOW(head["uow"], body),)))
            continue
        if op == "prune":
            operations.append((stash._prune, (int(head["horizon"]),)))
            continue
        answers.extend(answerBatch(stash._runBatch, operations, _answer))
        operations = []
        answers.append(_single(stash, op, head, body))
    answers.extend(answerBatch(stash._runBatch, operations, _answer))
    return answers


def _single(stash: Any, op: str, head: dict[str, Any], body: bytes) -> bytes:
    try:
        if op == "read":
            return _answer(stash._read(head["key"]))
        if op == "probe":
            return _answer(stash._check())
        raise ValueError(f"unknown call {op!r}")
    except Exception:
        return refusal(Failure())


def main(argv: list[str]) -> None:
    from ..blocking import inline
    from .filesystem import FilesystemStash

    name, root = argv
    stash = FilesystemStash(name, Path(root), inline)
    if becomeChild(Path(root, ".lock"), stash._open):
        # Spare files are made while no call waits (creating a file is the
        # costliest step of a write).
        serve(partial(_answers, stash), partial(readIn, stash.prepareSpare))


# The server's side.


def _result(answer: Answer) -> Any:
    head, body = answer
    error = refused(head)
    if error is not None:
        raise error
    if "verdict" in head:
        return Verdict.fromJSON(head["verdict"])
    if "uow" in head:
        return Document(body, head["type"], head["uow"])
    return head.get("count")


# The child of each root that a stash of this server has started, shared by
# every stash of this server on that root (the old and the new one while a
# reload hands over), so that one in-memory index of its undo records serves
# them all: the last of them to stop ends it.
_runners: dict[Path, ChildRunner] = {}


@implementer(IStash, IReader, IStartable, IProbe, ILocalStorage, IPrunable)
class FilesystemProcessStash(LocalRoot):
    """
    A L{FilesystemStash} run by a child process: the server's side.
    """

    def __init__(self, name: str, root: Path, reactor: Any) -> None:
        self.name = name
        self.root = root
        self._reactor = reactor
        self._runner: ChildRunner | None = None

    def start(self) -> Deferred[None]:
        if self._runner is None:
            runner = _runners.get(self.root)
            if runner is None:
                runner = _runners[self.root] = ChildRunner(
                    f"filesystem stash {self.name}",
                    "apicontainer.stashes.fsprocess",
                    [self.name, str(self.root)],
                    self._reactor,
                )
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
        return self._runner.call(head, body).addCallback(_result)

    def _uowCall(self, op: str, uow: UnitOfWork) -> Deferred[Any]:
        # Only a store needs the body.
        head, body = encodeUOW(uow, withBody=op == "stash")
        return self._call({"op": op, "uow": head}, body)

    def stash(self, uow: UnitOfWork) -> Deferred[Verdict]:
        return self._uowCall("stash", uow).addErrback(unavailable(self, uow, OSError))

    def commit(self, uow: UnitOfWork) -> Deferred[None]:
        return self._uowCall("commit", uow)

    def rollback(self, uow: UnitOfWork) -> Deferred[None]:
        return self._uowCall("rollback", uow)

    def prune(self, horizon: int) -> Deferred[int]:
        return self._call({"op": "prune", "horizon": horizon})

    def read(self, key: str) -> Deferred[Document | None]:
        return self._call({"op": "read", "key": key})

    def probe(self) -> Deferred[None]:
        return self._call({"op": "probe"})


if __name__ == "__main__":
    main(sys.argv[1:])
