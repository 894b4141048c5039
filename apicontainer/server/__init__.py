"""
The running server: the C{twist apicontainer} plugin's options and service,
the service that owns the listeners and reloads, the start-time path checks,
and the C{apicontainer} command line.
"""

from ._cli import run
from ._tap import Options, makeService

__all__ = ["Options", "makeService", "run"]
