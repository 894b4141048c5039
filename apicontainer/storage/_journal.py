"""
The journal: where a UOW's spool file is written and its final state
recorded, then its spool file removed.

The server's journal is a child process of its own, C{python -m
apicontainer.storage._journal DATA_DIR}, which opens the spool and the state store
of C{DATA_DIR} as the server does and answers two calls:

  - C{spool}: write the spool file of a UOW whose body the server holds in
    memory (a larger body stays in the file it arrived in, and the server
    spools it itself, a chunk at a time);
  - C{state}: record the final state of a UOW and, once it is durable,
    remove its spool file.

It runs the calls that reached it while it was busy as one batch: the spool
files with one C{syncfs}, the final states in one transaction, the removals
after the commit (group commit). In a process of its own that work waits
for no thread of the server to give up Python's GIL, and the server's
reactor gets the CPU it took. Only the child keeps
spare spool files (C{spares/}): a removed file goes there with its bytes,
which it empties once the batch is answered and no call waits. The server
keeps its own connection to the state store, for reads.

The child holds an exclusive lock on C{DATA_DIR/.journal.lock} for its
whole life, and says it is ready only once it has it: so a server restarted
after a crash, whose old child may still be finishing a batch, starts its
recovery only after that batch is done.

If the child ends with calls under way, each is sent once more, to a new
child: both calls may be made twice (a spool file is written whole under
its UOW's name; a final state replaces itself, and a removal of a file that
is gone does nothing). A spool write that fails again is refused, and its
file, if the child got that far, removed.

L{InlineJournal} does the same work in the server, through the spool and
the state store's own runners: for unit tests, and for a reactor that
cannot start processes.
"""

from __future__ import annotations

import sys
from functools import partial
from pathlib import Path
from typing import Any, Sequence

from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.python.failure import Failure
from zope.interface import implementer

from .._crashpoints import reach
from ..interfaces import IJournal
from ..uow import INLINE_BODY_BYTES, Status, UnitOfWork
from ._childprocess import CallBatch, ChildRunner, becomeChild, readIn, serve
from ._childprotocol import Answer, Command, decodeUOW, encodeUOW, frame, manyResults, refusal, refused
from ._spool import Spool, SpoolError, SpoolFull
from ._states import StateRecord, StateStore


def removeSpoolFile(spool: Spool, uowId: int, empty: bool = True) -> Exception | None:
    """
    Remove the spool file of a UOW whose final state is durable (blocking).

    @param empty: L{Spool.remove}'s.
    @return: The error, if it could not be removed (not raised).
    """
    reach("before-spool-delete")
    try:
        spool.remove(uowId, empty)
    except Exception as e:
        return e
    return None


# The calls of the server on its journal's child, both run in batches: the
# spool writes with one sync (Spool.runWrites), the final states in one
# transaction (StateStore.runBatch).
SPOOL = Command("spool")
STATE = Command("state")
# Many final states in one call, each spool file removed after: one answer
# with a result for each.
STATES = Command("states")


@implementer(IJournal)
class InlineJournal:
    """
    The journal's work done in the server, through the runners of C{spool}
    and C{states}.
    """

    def __init__(self, spool: Spool, states: StateStore) -> None:
        self._spool = spool
        self._states = states

    def start(self) -> Deferred[None]:
        return succeed(None)

    def stop(self) -> Deferred[None]:
        return succeed(None)

    def write(self, uow: UnitOfWork) -> Deferred[UnitOfWork]:
        return self._spool.write(uow)

    def settle(self, record: StateRecord, removeSpool: bool) -> Deferred[Exception | None]:
        then = partial(removeSpoolFile, self._spool, record.uow) if removeSpool else None
        return self._states.record(record, then=then)

    def settleBatch(self, records: Sequence[StateRecord]) -> Deferred[list[Exception | Failure | None]]:
        return settleEach(self, records)


def settleEach(journal: IJournal, records: Sequence[StateRecord]) -> Deferred[list[Exception | Failure | None]]:
    """
    L{IJournal.settleBatch} as one L{IJournal.settle} for each record: for
    a journal that has no batch of its own.
    """
    calls = [journal.settle(record, removeSpool=True) for record in records]
    return DeferredList(calls, consumeErrors=True).addCallback(lambda results: [value for _, value in results])


def _recordFields(r: StateRecord) -> list[Any]:
    return [r.uow, r.key, r.route, r.state.value, r.status, r.report, r.idempotencyKey, r.payloadHash, r.at]


def _record(fields: list[Any]) -> StateRecord:
    uow, key, route, state, *rest = fields
    return StateRecord(uow, key, route, Status(state), *rest)


# The child.


def _removalText(value: Any) -> str | None:
    """
    The error of a removal that failed (an exception as the outcome of a
    final state's operation), if it did.
    """
    return (str(value) or type(value).__name__) if isinstance(value, Exception) else None


def _answer(value: Any) -> bytes:
    removal = _removalText(value)
    return frame({"ok": True} if removal is None else {"ok": True, "removal": removal})


def _answers(spool: Spool, states: StateStore, calls: list[Answer]) -> list[bytes]:
    """
    The answers of C{calls}: the spool writes go in one batch and the final
    states in another.
    """
    answers: list[bytes] = []
    writes, settlements = CallBatch(answers), CallBatch(answers)
    for head, body in calls:
        try:
            op = head["op"]
            if op == SPOOL.name:
                writes.add([(spool.writeNow, (decodeUOW(head["uow"], body),))])
            elif op == STATE.name:
                record = _record(head["record"])
                # Emptied once the answers are out (main).
                then = partial(removeSpoolFile, spool, record.uow, empty=False) if head["remove"] else None
                settlements.add([(states.insertNow, (record, then))])
            elif op == STATES.name:
                records = [_record(fields) for fields in head["records"]]
                remove = [partial(removeSpoolFile, spool, record.uow, empty=False) for record in records]
                settlements.add([(states.insertNow, pair) for pair in zip(records, remove)], many=True)
            else:
                raise ValueError(f"unknown call {op!r}")
        except Exception:
            answers.append(refusal(Failure()))
    writes.run(spool.runWrites, _answer, _removalText)
    settlements.run(states.runBatch, _answer, _removalText)
    return answers


def main(argv: list[str]) -> None:
    from ..blocking import inline

    (dataDir,) = argv
    data = Path(dataDir)
    spool = Spool(data / "spool", data / "quarantine", inline, data / "spares")
    states = StateStore(data / "state.sqlite3", inline)

    def open() -> None:
        # The server removed the temporaries of cut-short writes before it
        # started any: this child may be a second one, with writes of the
        # server's under way.
        spool.open(clean=False)
        states.open()

    if becomeChild(data / ".journal.lock", open):
        # The removed spool files are emptied while no call waits, not
        # before their batch's answers.
        serve(partial(_answers, spool, states), partial(readIn, spool.emptySpare))
        while spool.emptySpare():  # the server has stopped: none is left holding bytes
            pass


# The server's side.

_SPOOL_ERRORS: dict[str, type[Exception]] = {"SpoolFull": SpoolFull, "SpoolError": SpoolError}


@implementer(IJournal)
class ProcessJournal:
    """
    The journal in a child process: the server's side.
    """

    def __init__(self, dataDir: Path, spool: Spool, reactor: Any) -> None:
        """
        @param spool: The server's spool (with no spares): it writes the
            large bodies, and removes what a failed write left.
        """
        self._spool = spool
        self._runner = ChildRunner("the journal", "apicontainer.storage._journal", [str(dataDir)], reactor)

    @property
    def pid(self) -> int | None:
        """
        The child's process id, while it runs.
        """
        return self._runner.pid

    def start(self) -> Deferred[None]:
        return self._runner.ready()

    def stop(self) -> Deferred[None]:
        return self._runner.stop()

    def _call(self, head: dict[str, Any], body: bytes = b"") -> Deferred[Answer]:
        def again(reason: Failure) -> Deferred[Answer]:
            reason.trap(OSError)  # the child ended: once more, to a new one
            return self._runner.call(head, body)

        return self._runner.call(head, body).addErrback(again)

    def write(self, uow: UnitOfWork) -> Deferred[UnitOfWork]:
        if not isinstance(uow._body, bytes) or len(uow._body) > INLINE_BODY_BYTES:
            return self._spool.write(uow)
        head, body = encodeUOW(uow)

        def written(answer: Answer) -> UnitOfWork:
            error = refused(answer[0], _SPOOL_ERRORS)
            if error is not None:
                raise error if isinstance(error, SpoolError) else SpoolError(f"spool write failed: {error}")
            return uow

        def lost(reason: Failure) -> Deferred[UnitOfWork]:
            # No child runs: whatever the last one wrote goes.
            def refuse(_: object) -> UnitOfWork:
                raise SpoolError(f"spool write failed: {reason.value}")

            return self._spool.delete(uow.id).addBoth(refuse)

        return self._call({"op": SPOOL.name, "uow": head}, body).addCallbacks(written, lost)

    def settle(self, record: StateRecord, removeSpool: bool) -> Deferred[Exception | None]:
        def recorded(answer: Answer) -> Exception | None:
            head = answer[0]
            error = refused(head)
            if error is not None:
                raise error
            return OSError(head["removal"]) if "removal" in head else None

        return self._call({"op": STATE.name, "record": _recordFields(record), "remove": removeSpool}).addCallback(
            recorded
        )

    def settleBatch(self, records: Sequence[StateRecord]) -> Deferred[list[Exception | Failure | None]]:
        def recorded(answer: Answer) -> list[Exception | Failure | None]:
            return [
                (None if value is None else OSError(value)) if ok else value
                for ok, value in manyResults(answer[0], len(records))
            ]

        return self._call({"op": STATES.name, "records": [_recordFields(r) for r in records]}).addCallback(recorded)


if __name__ == "__main__":
    main(sys.argv[1:])
