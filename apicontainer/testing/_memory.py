"""
L{MemoryStash}: the reference stash, in memory, that can be told to
misbehave; L{BatchMemoryStash}, the same taking batches.
"""

from __future__ import annotations

from typing import Any, Sequence

from attrs import define
from twisted.internet.defer import Deferred, DeferredList, maybeDeferred, succeed
from twisted.python.failure import Failure
from zope.interface import implementer

from ..interfaces import IBatchStash, IPrunable, IReader, IStash
from ..uow import Document, UnitOfWork, Verdict


@define
class _Undo:
    attempt: int
    state: str
    before: Document | None = None


@implementer(IStash, IReader, IPrunable)
class MemoryStash:
    """
    A stash that keeps documents in a dict, with the same rules as the
    built-in stashes, and that can be told to misbehave.

    @ivar documents: Key to the current L{Document}; a deleted document is a
        L{Document} whose body is L{None}.
    @ivar failWith: When set, C{stash} fails with this status.
    @ivar failAfterWrite: When true, C{stash} writes and then fails with
        C{failWith}: a stash that failed halfway.
    @ivar hang: When true, C{stash} never answers (until cancelled, as the
        stash worker's timeout does).
    @ivar decline: When true, C{stash} declines every UOW.
    @ivar failRollback: When true, C{rollback} fails.
    @ivar failCommits: How many of the next C{commit} calls fail (as a
        commit fails whose sync failed, or whose process ended).
    @ivar calls: Every call, as C{(method, uow id)}, in order.
    @ivar journal: A list, perhaps shared between stashes, that every call is
        appended to as C{(stash name, method, uow id)}.
    """

    def __init__(
        self,
        name: str,
        failWith: int | None = None,
        failAfterWrite: bool = False,
        hang: bool = False,
        decline: bool = False,
        failRollback: bool = False,
        journal: list[tuple[str, str, int]] | None = None,
        failCommits: int = 0,
    ) -> None:
        self.name = name
        self.failWith = failWith
        self.failAfterWrite = failAfterWrite
        self.hang = hang
        self.decline = decline
        self.failRollback = failRollback
        self.failCommits = failCommits
        self.journal = [] if journal is None else journal
        self.documents: dict[str, Document] = {}
        self.undo: dict[int, _Undo] = {}
        self.calls: list[tuple[str, int]] = []
        self.hanging: list[Deferred[Verdict]] = []

    def _called(self, method: str, uow: UnitOfWork) -> None:
        self.calls.append((method, uow.id))
        self.journal.append((self.name, method, uow.id))

    def stash(self, uow: UnitOfWork) -> Deferred[Verdict]:
        self._called("stash", uow)
        if self.decline:
            return succeed(Verdict.declined("told to decline"))
        if self.hang:
            waiting: Deferred[Verdict] = Deferred()
            self.hanging.append(waiting)
            return waiting
        if self.failWith is not None and not self.failAfterWrite:
            return succeed(Verdict.failed(self.failWith, "told to fail"))
        verdict = self._apply(uow)
        if self.failWith is not None:
            return succeed(Verdict.failed(self.failWith, "told to fail after writing"))
        return succeed(verdict)

    def _apply(self, uow: UnitOfWork) -> Verdict:
        undo = self.undo.get(uow.id)
        if undo is not None:
            if undo.state == "prepared":
                return Verdict.stored(detail="already stored")
            if undo.attempt >= uow.attempt:
                return Verdict.declined("rolled back before it arrived")
        current = self.documents.get(uow.key)
        if current is not None and current.uow >= uow.id:
            if current.uow == uow.id:
                return Verdict.stored(detail="already stored")
            return Verdict.declined(f"superseded by UOW {current.uow}")
        self.undo[uow.id] = _Undo(uow.attempt, "prepared", current)
        body: Any = None if uow.isDelete else uow.body
        self.documents[uow.key] = Document(body, uow.contentType, uow.id)
        return Verdict.stored()

    def rollback(self, uow: UnitOfWork) -> Deferred[None]:
        self._called("rollback", uow)
        if self.failRollback:
            raise OSError("told to fail rollback")
        undo = self.undo.get(uow.id)
        if undo is None:
            self.undo[uow.id] = _Undo(uow.attempt, "rolledback")
            return succeed(None)
        if undo.state == "prepared":
            current = self.documents.get(uow.key)
            if current is not None and current.uow == uow.id:
                if undo.before is None:
                    del self.documents[uow.key]
                else:
                    self.documents[uow.key] = undo.before
            else:
                for later in self.undo.values():
                    if later.state == "prepared" and later.before is not None and later.before.uow == uow.id:
                        later.before = undo.before
        self.undo[uow.id] = _Undo(max(undo.attempt, uow.attempt), "rolledback")
        return succeed(None)

    def prune(self, horizon: int) -> Deferred[int]:
        old = [uowId for uowId, undo in self.undo.items() if undo.state == "rolledback" and undo.attempt < horizon]
        for uowId in old:
            del self.undo[uowId]
        return succeed(len(old))

    def commit(self, uow: UnitOfWork) -> Deferred[None]:
        self._called("commit", uow)
        if self.failCommits:
            self.failCommits -= 1
            raise OSError("told to fail commit")
        self.undo.pop(uow.id, None)
        return succeed(None)

    def read(self, key: str) -> Deferred[Document | None]:
        document = self.documents.get(key)
        if document is None or document.body is None:
            return succeed(None)
        return succeed(document)

    def bodies(self) -> dict[str, bytes]:
        """
        Key to body of every document present (deleted ones left out).
        """
        return {k: d.body for k, d in self.documents.items() if d.body is not None}


@implementer(IBatchStash, IReader, IPrunable)
class BatchMemoryStash(MemoryStash):
    """
    A L{MemoryStash} that takes batches (L{IBatchStash}): each UOW of a
    batch goes through L{MemoryStash}'s own C{stash} and C{commit}, in
    order, and each batch call is recorded.

    @ivar batches: Every batch call, as C{(method, uow ids)}, in order.
    @ivar failBatches: How many of the next batch calls fail as a whole.
    """

    def __init__(self, name: str, **kw: Any) -> None:
        super().__init__(name, **kw)
        self.batches: list[tuple[str, tuple[int, ...]]] = []
        self.failBatches = 0

    def _batchCalled(self, method: str, uows: Sequence[UnitOfWork]) -> None:
        self.batches.append((method, tuple(uow.id for uow in uows)))
        if self.failBatches:
            self.failBatches -= 1
            raise OSError(f"told to fail {method}")

    def stashBatch(self, uows: Sequence[UnitOfWork]) -> Deferred[list[Verdict]]:
        self._batchCalled("stashBatch", uows)

        def verdicts(results: list[tuple[bool, Any]]) -> Any:
            # A failure (a cancellation, when a hanging batch times out) as it is.
            for ok, value in results:
                if not ok:
                    return value
            return [value for _, value in results]

        return DeferredList([self.stash(uow) for uow in uows], consumeErrors=True).addCallback(verdicts)

    def commitBatch(self, uows: Sequence[UnitOfWork]) -> Deferred[list[Failure | None]]:
        self._batchCalled("commitBatch", uows)
        return DeferredList([maybeDeferred(self.commit, uow) for uow in uows], consumeErrors=True).addCallback(
            lambda results: [None if ok else value for ok, value in results]
        )
