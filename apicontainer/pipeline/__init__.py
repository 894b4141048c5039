"""
The pipeline a UOW goes through once spooled: the L{Container} that owns it
all, the front queue that numbers UOWs, the fanout and its per-stash workers,
the retry engine, recovery at start, the idempotency index and the metrics.
"""

from ._container import BeingRetried, Container, NotFailed
from ._deadlines import Deadlines
from ._frontqueue import Admission
from ._idempotency import BadIdempotencyKey, KeyConflict, validateKey
from ._stashset import buildStashes, shielded

__all__ = [
    "Admission",
    "BadIdempotencyKey",
    "BeingRetried",
    "Container",
    "Deadlines",
    "KeyConflict",
    "NotFailed",
    "buildStashes",
    "shielded",
    "validateKey",
]
