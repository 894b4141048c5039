"""
The front queue: where a request becomes a numbered, spooled unit of work.
"""

from __future__ import annotations

from typing import Callable, Protocol

from attrs import evolve, frozen
from twisted.internet.defer import Deferred, DeferredQueue

from .._crashpoints import reach
from ..interfaces import IJournal
from ..storage import UOWIds
from ..uow import Report, UnitOfWork


@frozen
class Admission:
    """
    A UOW on the front queue, with the Deferred that fires with its report.
    """

    uow: UnitOfWork
    done: Deferred[Report]


class Front(Protocol):
    """
    What the fanout, the retry engine and recovery need of a front queue:
    the queue of admissions, and fresh attempt ids. L{FrontQueue} on a local
    spool; the shared spool's front publishes instead.
    """

    queue: DeferredQueue[Admission]

    async def newAttempt(self, uow: UnitOfWork) -> UnitOfWork: ...


class FrontQueue:
    """
    Numbers each request, spools it, and queues it in UOW id order.

    The id is taken before the spool write so that the spool file carries it:
    a replay after a crash then reaches every stash under the same id, which
    is what makes stashes idempotent. Spool writes finish in any order; the
    queue releases UOWs in id order all the same, so that UOWs on one key
    are applied in UOW order.

    @ivar queue: The C{DeferredQueue} of L{Admission}s the fanout reads.
    """

    def __init__(
        self,
        ids: UOWIds,
        journal: IJournal,
        onSpooled: Callable[[UnitOfWork], None] = lambda uow: None,
    ) -> None:
        """
        @param onSpooled: Called with each UOW once it is spooled, before it
            can reach the fanout.
        """
        self.queue: DeferredQueue[Admission] = DeferredQueue()
        self._ids = ids
        self._journal = journal
        self._onSpooled = onSpooled
        self._nextRelease = ids.first
        self._held: dict[int, Admission | None] = {}

    async def admit(self, request: UnitOfWork) -> Admission:
        """
        Give C{request} its UOW id, spool it durably and queue it.

        @param request: The request, with any id: it is replaced.
        @return: The admission, whose C{done} fires with the UOW's report.
        @raise apicontainer.storage.SpoolError: Nothing was spooled or queued.
        """
        uowId = await self._ids.allocate()
        uow = evolve(request, id=uowId, attempt=uowId)
        try:
            uow = await self._journal.write(uow)
        except BaseException:
            self._release(uowId, None)
            raise
        reach("after-spool-write")
        self._onSpooled(uow)
        admission = Admission(uow, Deferred())
        self._release(uowId, admission)
        return admission

    async def newAttempt(self, uow: UnitOfWork) -> UnitOfWork:
        """
        C{uow} under a fresh attempt id, for a retry or a re-drive: the id is
        taken from the UOW id sequence, so it is greater than every attempt
        before it, also those made before a crash.
        """
        attempt = await self._ids.allocate()
        self._release(attempt, None)
        return evolve(uow, attempt=attempt)

    def _release(self, uowId: int, admission: Admission | None) -> None:
        self._held[uowId] = admission
        while self._nextRelease in self._held:
            ready = self._held.pop(self._nextRelease)
            self._nextRelease += 1
            if ready is not None:
                self.queue.put(ready)
