"""
The front queue: where a request becomes a numbered, spooled unit of work.
"""

from __future__ import annotations

from attrs import evolve, frozen
from twisted.internet.defer import Deferred, DeferredQueue

from .spool import Spool
from .uow import Report, UnitOfWork
from .uowids import UOWIds


@frozen
class Admission:
    """
    A UOW on the front queue, with the Deferred that fires with its report.
    """

    uow: UnitOfWork
    done: Deferred[Report]


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

    def __init__(self, ids: UOWIds, spool: Spool) -> None:
        self.queue: DeferredQueue[Admission] = DeferredQueue()
        self._ids = ids
        self._spool = spool
        self._nextRelease = ids.first
        self._held: dict[int, Admission | None] = {}

    async def admit(self, request: UnitOfWork) -> Admission:
        """
        Give C{request} its UOW id, spool it durably and queue it.

        @param request: The request, with any id: it is replaced.
        @return: The admission, whose C{done} fires with the UOW's report.
        @raise apicontainer.spool.SpoolError: Nothing was spooled or queued.
        """
        uowId = await self._ids.allocate()
        uow = evolve(request, id=uowId)
        try:
            await self._spool.write(uow)
        except BaseException:
            self._release(uowId, None)
            raise
        admission = Admission(uow, Deferred())
        self._release(uowId, admission)
        return admission

    def requeue(self, uow: UnitOfWork) -> Admission:
        """
        Queue an already spooled UOW again (a retry), outside the id order.
        """
        admission = Admission(uow, Deferred())
        self.queue.put(admission)
        return admission

    def _release(self, uowId: int, admission: Admission | None) -> None:
        self._held[uowId] = admission
        while self._nextRelease in self._held:
            ready = self._held.pop(self._nextRelease)
            self._nextRelease += 1
            if ready is not None:
                self.queue.put(ready)
