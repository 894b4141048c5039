"""
The YAML configuration: loaded, validated, and every error tied to its line.

A wrong configuration stops the start with one line, for example::

    config.yaml:12: stashes.files.type: unknown stash type 'filesytem'
    (known: filesystem, http, postgres, redis, sqlite)

A stash factory reads its options through the L{Section} in its
L{StashSpec}, so that its errors read the same. A stash's C{type} names a
factory found by L{stashTypes}: the built-in ones, and those of the entry
point group C{apicontainer.stashes}.
"""

from ._load import (
    DEFAULT_CONFIG,
    FAILQUEUE_BACKENDS,
    SPOOL_BACKENDS,
    Config,
    Limits,
    RouteSpec,
    StashSpec,
    isLoopbackOnly,
    loadConfig,
)
from ._registry import ENTRY_POINT_GROUP, StashFactory, stashFactory, stashTypes
from ._section import ConfigError, Section

__all__ = [
    "DEFAULT_CONFIG",
    "ENTRY_POINT_GROUP",
    "FAILQUEUE_BACKENDS",
    "SPOOL_BACKENDS",
    "Config",
    "ConfigError",
    "Limits",
    "RouteSpec",
    "Section",
    "StashFactory",
    "StashSpec",
    "isLoopbackOnly",
    "loadConfig",
    "stashFactory",
    "stashTypes",
]
