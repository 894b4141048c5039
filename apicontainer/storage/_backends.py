"""
The backends of the spool and of the fail queue, found by the names the
configuration gives them (C{spool.backend}, C{failqueue.backend}).

A spool backend keeps what a UOW is until it settles: the spool itself, the
journal that writes it, the UOW ids and the final states. A fail queue
backend keeps the UOWs that wait for a retry. The pipeline reaches both only
through their interfaces (L{ISpool}, L{IJournal}, L{IFailQueue}), so that a
backend is added here, not there.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any, Callable

from attrs import frozen
from twisted.internet.interfaces import IReactorTime

from ..blocking import Blocking
from ..interfaces import IFailQueue, IJournal, ISpool
from ._failqueue import FileFailQueue, RetryPolicy
from ._jetstream import JetStreamLink, JetStreamSettings
from ._jsspool import StreamIds, StreamJournal, StreamSpool
from ._journal import InlineJournal, ProcessJournal
from ._jsstate import SharedFailQueue, SharedStates
from ._spool import Spool
from ._states import StateStore
from ._uowids import UOWIds


@frozen
class SpoolBackend:
    """
    What a spool backend gives the pipeline.
    """

    spool: ISpool
    journal: IJournal
    ids: Any
    states: Any
    # The cluster link of a shared backend, L{None} for a local one.
    link: JetStreamLink | None = None


def fileSpool(
    dataDir: Path, blocking: Blocking, serial: Blocking | None, processes: Any, settings: Any = None
) -> SpoolBackend:
    """
    The C{file} spool: a file per UOW in C{data_dir/spool}, written by the
    journal's child process when C{processes} (a reactor) can start one, else
    through C{serial}; UOW ids in C{data_dir/uow-ids}; final states in
    C{data_dir/state.sqlite3}.

    @param serial: Runs the spool's and the state store's calls, one at a
        time, on one thread; by default C{blocking}, which must then be
        serial too.
    """
    # Only the one that writes the spool files keeps spares.
    spares = None if processes is not None else dataDir / "spares"
    spool = Spool(dataDir / "spool", dataDir / "quarantine", serial or blocking, spares)
    states = StateStore(dataDir / "state.sqlite3", serial or blocking)
    journal: IJournal = (
        InlineJournal(spool, states) if processes is None else ProcessJournal(dataDir, spool, processes)
    )
    return SpoolBackend(spool, journal, UOWIds(dataDir / "uow-ids", blocking), states)


def fileFailQueue(
    dataDir: Path,
    blocking: Blocking,
    clock: IReactorTime,
    retry: RetryPolicy,
    uniform: Callable[[], float] = random.random,
    spool: SpoolBackend | None = None,
) -> IFailQueue:
    """
    The C{file} fail queue: a JSON file per UOW in C{data_dir/failed}.
    """
    return FileFailQueue(dataDir / "failed", blocking, clock, retry, uniform)


def jetstreamSpool(
    dataDir: Path, blocking: Blocking, serial: Blocking | None, processes: Any, settings: JetStreamSettings
) -> SpoolBackend:
    """
    The C{jetstream} spool: UOWs in a replicated stream, final states and
    idempotency records in key-value buckets, shared by every instance
    (L{apicontainer.storage._jetstream}). It connects when the journal
    starts.
    """
    link = JetStreamLink(settings)
    spool = StreamSpool(link, dataDir)
    states = SharedStates(link)
    return SpoolBackend(spool, StreamJournal(link, spool, states), StreamIds(link), states, link)


def jetstreamFailQueue(
    dataDir: Path,
    blocking: Blocking,
    clock: IReactorTime,
    retry: RetryPolicy,
    uniform: Callable[[], float] = random.random,
    spool: SpoolBackend | None = None,
) -> IFailQueue:
    """
    The C{jetstream} fail queue: a bucket shared by every instance, on the
    C{jetstream} spool's cluster.
    """
    if spool is None or spool.link is None:
        raise ValueError("failqueue.backend: jetstream needs spool.backend: jetstream")
    return SharedFailQueue(spool.link, clock, retry, uniform)


SPOOL_BACKENDS: dict[str, Callable[..., SpoolBackend]] = {"file": fileSpool, "jetstream": jetstreamSpool}
FAILQUEUE_BACKENDS: dict[str, Callable[..., IFailQueue]] = {"file": fileFailQueue, "jetstream": jetstreamFailQueue}
