"""
The built-in stashes, and what every stash factory is given.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from attrs import frozen
from twisted.internet.interfaces import IReactorTime

from ..blocking import Blocking


@frozen
class StashContext:
    """
    What a stash factory may use besides its own options.

    @ivar clock: The clock every wait and timeout runs on.
    @ivar reactor: The reactor, for stashes that open connections (in the
        server, the same object as C{clock}).
    @ivar dataDir: The data directory; relative paths in stash options are
        resolved against it.
    @ivar blocking: A shared runner for short blocking calls.
    @ivar serial: Makes a runner of the stash's own that runs one call at a
        time, in the order given: for a driver whose connection must not be
        shared between threads (C{serial(name)}).
    """

    clock: IReactorTime
    dataDir: Path
    blocking: Blocking
    serial: Callable[[str], Blocking]
    reactor: Any = None

    def path(self, value: str) -> Path:
        """
        Resolve a path option against the data directory.
        """
        return self.dataDir / value
