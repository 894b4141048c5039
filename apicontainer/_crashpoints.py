"""
Named points in the pipeline where a test can make the server die.

Set C{APICONTAINER_CRASH_AT} to a comma-separated list of point names and the
process kills itself with SIGKILL on reaching any of them: this is how the
crash-point tests prove that a crash at each step loses nothing. Unset (as
in production), L{reach} is one set lookup.

The points: C{after-spool-write}, C{stored:<stash name>} (a stash gave its
stored verdict), C{during-commit} and C{during-rollback} (after the first
stash's), C{after-failqueue-write}, C{before-spool-delete}. A point reached in
a helper process of the server (the journal's) kills the server first, as a
crash of the machine would.
"""

from __future__ import annotations

import os
import signal

ENVIRONMENT = "APICONTAINER_CRASH_AT"

_armed = frozenset(filter(None, os.environ.get(ENVIRONMENT, "").split(",")))
_helper = False


def inHelper() -> None:
    """
    Say that this process is a helper of the server, its parent.
    """
    global _helper
    _helper = True


def reach(point: str) -> None:
    """
    Die here if C{point} is armed.
    """
    if point in _armed:
        if _helper:
            os.kill(os.getppid(), signal.SIGKILL)
        os.kill(os.getpid(), signal.SIGKILL)
