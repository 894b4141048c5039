"""
The C{filesystem} stash in a process of its own (C{process: true}).

The server hands the stash's calls to a child process, C{python -m
apicontainer.stashes._fsprocess NAME ROOT}, which runs an ordinary
L{FilesystemStash} on C{ROOT}. The child runs the calls that reach it while
it was busy as one batch (group commit: one C{syncfs} for them all), with no
thread beside it: its system calls wait for no other thread to give up
Python's GIL, and none of its work is done by the server's process.

Calls and answers go over the child's standard input and output, framed as
L{apicontainer.storage._childprotocol} says: a frame's body is a UOW's body (or a
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
from typing import Any, Sequence

from twisted.internet.defer import Deferred, fail, succeed
from twisted.python.failure import Failure
from zope.interface import implementer

from ..interfaces import IBatchStash, ILocalStorage, IProbe, IPrunable, IReader, IStartable
from ..storage import (
    Answer,
    CallBatch,
    ChildRunner,
    Command,
    Operation,
    Result,
    becomeChild,
    decodeUOW,
    encodeUOW,
    frame,
    manyResults,
    readIn,
    refusal,
    refused,
    serve,
)
from ..uow import Document, UnitOfWork, Verdict
from ._context import allUnavailable, unavailable, verdictsOf
from ._filesystem import LocalRoot

# The child.


# The calls of the server on a filesystem stash's child: writes, commits,
# rollbacks and prunes run in one batch (FilesystemStash.runBatch), with
# those of the calls that reached the child together; reads and probes on
# their own between batches. A batch call (stash_batch, commit_batch) carries
# many UOWs, and its answer a result for each.
STASH = Command("stash")
COMMIT = Command("commit")
ROLLBACK = Command("rollback")
PRUNE = Command("prune")
STASH_BATCH = Command("stash_batch")
COMMIT_BATCH = Command("commit_batch")
READ = Command("read", batched=False)
PROBE = Command("probe", batched=False)
_COMMANDS = {
    command.name: command
    for command in (STASH, COMMIT, ROLLBACK, PRUNE, STASH_BATCH, COMMIT_BATCH, READ, PROBE)
}
_MANY = {STASH_BATCH: STASH, COMMIT_BATCH: COMMIT}


def _verdictJSON(result: Any) -> Any:
    return result.asJSON() if isinstance(result, Verdict) else None


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
    batch = CallBatch(answers)
    for head, body in calls:
        command = _COMMANDS.get(head["op"])
        if command is not None and command.batched:
            try:
                operations = _operations(stash, command, head, body)
            except Exception:
                answers.append(refusal(Failure()))
                continue
            batch.add(operations, many=command in _MANY)
            continue
        batch.run(stash.runBatch, _answer, _verdictJSON)
        answers.append(_single(stash, command, head))
    batch.run(stash.runBatch, _answer, _verdictJSON)
    return answers


def _operations(stash: Any, command: Command, head: dict[str, Any], body: bytes) -> list[Operation]:
    """
    The batch operations of a batched call: one, or one per UOW of a batch
    call.
    """
    if command is PRUNE:
        return [(stash.pruneNow, (int(head["horizon"]),))]
    if command in _MANY:
        run = stash.stashNow if command is STASH_BATCH else stash.commitNow
        operations: list[Operation] = []
        start = 0
        for uow, size in zip(head["uows"], head["sizes"]):
            operations.append((run, (decodeUOW(uow, body[start : start + size]),)))
            start += size
        if not operations:
            raise ValueError("a batch call without UOWs")
        return operations
    run = {STASH: stash.stashNow, COMMIT: stash.commitNow, ROLLBACK: stash.rollbackNow}[command]
    return [(run, (decodeUOW(head["uow"], body),))]


def _single(stash: Any, command: Command | None, head: dict[str, Any]) -> bytes:
    try:
        if command is READ:
            return _answer(stash.readNow(head["key"]))
        if command is PROBE:
            return _answer(stash.checkNow())
        raise ValueError(f"unknown call {head['op']!r}")
    except Exception:
        return refusal(Failure())


def main(argv: list[str]) -> None:
    from ..blocking import inline
    from ._filesystem import FilesystemStash

    name, root = argv
    stash = FilesystemStash(name, Path(root), inline)
    if becomeChild(Path(root, ".lock"), stash.openNow):
        # Spare files are made while no call waits (creating a file is the
        # costliest step of a write).
        serve(partial(_answers, stash), partial(readIn, stash.prepareSpare))


# The server's side.


def _verdicts(outcomes: list[Result]) -> list[Result]:
    return [(True, Verdict.fromJSON(value)) if ok else (False, value) for ok, value in outcomes]


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


@implementer(IBatchStash, IReader, IStartable, IProbe, ILocalStorage, IPrunable)
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
                    "apicontainer.stashes._fsprocess",
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

    def _uowCall(self, command: Command, uow: UnitOfWork) -> Deferred[Any]:
        # Only a store needs the body.
        head, body = encodeUOW(uow, withBody=command is STASH)
        return self._call({"op": command.name, "uow": head}, body)

    def stash(self, uow: UnitOfWork) -> Deferred[Verdict]:
        return self._uowCall(STASH, uow).addErrback(unavailable(self, uow, OSError))

    def commit(self, uow: UnitOfWork) -> Deferred[None]:
        return self._uowCall(COMMIT, uow)

    def _batchCall(self, command: Command, uows: Sequence[UnitOfWork]) -> Deferred[list[Result]]:
        heads, bodies = [], []
        for uow in uows:
            head, body = encodeUOW(uow, withBody=command is STASH_BATCH)
            heads.append(head)
            bodies.append(body)
        call = {"op": command.name, "uows": heads, "sizes": [len(body) for body in bodies]}
        if self._runner is None:
            return fail(OSError(f"filesystem stash {self.name} is not started"))
        return self._runner.call(call, b"".join(bodies)).addCallback(lambda answer: manyResults(answer[0], len(uows)))

    def stashBatch(self, uows: Sequence[UnitOfWork]) -> Deferred[list[Verdict]]:
        return (
            self._batchCall(STASH_BATCH, uows)
            .addCallback(lambda outcomes: verdictsOf(self, uows, _verdicts(outcomes), OSError))
            .addErrback(allUnavailable(self, uows, OSError))
        )

    def commitBatch(self, uows: Sequence[UnitOfWork]) -> Deferred[list[Failure | None]]:
        return self._batchCall(COMMIT_BATCH, uows).addCallback(
            lambda outcomes: [None if ok else failure for ok, failure in outcomes]
        )

    def rollback(self, uow: UnitOfWork) -> Deferred[None]:
        return self._uowCall(ROLLBACK, uow)

    def prune(self, horizon: int) -> Deferred[int]:
        return self._call({"op": PRUNE.name, "horizon": horizon})

    def read(self, key: str) -> Deferred[Document | None]:
        return self._call({"op": READ.name, "key": key})

    def probe(self) -> Deferred[None]:
        return self._call({"op": PROBE.name})


if __name__ == "__main__":
    main(sys.argv[1:])
