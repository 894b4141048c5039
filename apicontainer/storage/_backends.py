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
from ._journal import InlineJournal, ProcessJournal
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
    ids: UOWIds
    states: StateStore


def fileSpool(dataDir: Path, blocking: Blocking, serial: Blocking | None, processes: Any) -> SpoolBackend:
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
) -> IFailQueue:
    """
    The C{file} fail queue: a JSON file per UOW in C{data_dir/failed}.
    """
    return FileFailQueue(dataDir / "failed", blocking, clock, retry, uniform)


SPOOL_BACKENDS: dict[str, Callable[..., SpoolBackend]] = {"file": fileSpool}
FAILQUEUE_BACKENDS: dict[str, Callable[..., IFailQueue]] = {"file": fileFailQueue}
