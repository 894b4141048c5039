"""
What the retention lets go, forgotten on a schedule: old final UOW states,
and the old rollback markers of the stashes that keep them.
"""

from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING, Any

from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from ..interfaces import IPrunable

if TYPE_CHECKING:
    from ._container import Container


class Housekeeping:
    """
    The housekeeping of one container, every C{idempotency.retention_s}
    (at most hourly).
    """

    log = Logger(namespace="apicontainer.pipeline.container")

    def __init__(self, container: Container) -> None:
        self._container = container
        self._loop: LoopingCall | None = None
        # (when, the next UOW id then), for markerHorizon.
        self._idsSeen: deque[tuple[float, int]] = deque()

    def start(self) -> None:
        container = self._container
        self._idsSeen.append((container.clock.seconds(), container.ids.first))
        self._loop = LoopingCall(self.run)
        self._loop.clock = container.clock
        self._loop.start(min(container.config.idempotencyRetention, 3600.0), now=False)

    def stop(self) -> None:
        if self._loop is not None and self._loop.running:
            self._loop.stop()

    def run(self) -> Deferred[Any]:
        """
        Forget old final states and old rollback markers.
        """
        return DeferredList([self._forgetOldStates(), Deferred.fromCoroutine(self._pruneMarkers())])

    def markerHorizon(self) -> int | None:
        """
        The attempt id below which no attempt can see a stash call any
        more: the next id (UOW and attempt ids share one sequence) of
        C{idempotency.retention_s} ago, from the ids seen at start and at
        each housekeeping, and below every UOW under way, failed or
        unsettled. L{None} until the server has run for the retention.
        """
        container = self._container
        now = container.clock.seconds()
        self._idsSeen.append((now, container.ids.first))
        cutoff = now - container.config.idempotencyRetention
        while len(self._idsSeen) > 1 and self._idsSeen[1][0] <= cutoff:
            self._idsSeen.popleft()
        if self._idsSeen[0][0] > cutoff:
            return None
        horizon = self._idsSeen[0][1]
        if container.fanout is not None:
            horizon = min([horizon, *container.fanout.unsettled, *container.records.underWay()])
        return min([horizon, *(entry.uow for entry in container.failQueue.list())])

    async def _pruneMarkers(self) -> None:
        container = self._container
        horizon = self.markerHorizon()
        if horizon is None:
            return
        for name, stash in list(container.stashes.items()):
            if not IPrunable.providedBy(stash):
                continue
            try:
                count = await stash.prune(horizon)
            except Exception:
                self.log.failure("stash {stash} could not forget old rollback markers", stash=name)
                continue
            if count:
                self.log.info(
                    "stash {stash} forgot {count} rollback marker(s) of attempts before {horizon}",
                    stash=name,
                    count=count,
                    horizon=horizon,
                )

    def _forgetOldStates(self) -> Deferred[None]:
        container = self._container
        before = container.clock.seconds() - container.config.idempotencyRetention

        def purged(count: int) -> None:
            if count:
                self.log.info("forgot {count} final UOW states older than the retention", count=count)

        def failed(reason: Any) -> None:
            self.log.failure("could not forget old UOW states", reason)

        return container.states.purge(before).addCallbacks(purged, failed)
