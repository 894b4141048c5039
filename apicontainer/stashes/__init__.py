"""
Stashes: the destinations a UOW is delivered to.

The built-in types (C{sqlite}, C{filesystem}, C{postgres}, C{redis},
C{http}) live in this package's private modules and are found by name
through L{stashFactory}; another package adds its own type through the
entry point group C{apicontainer.stashes} (see L{stashTypes}). A factory is
given the stash's L{apicontainer.config.StashSpec} and a L{StashContext}.
"""

from ..config import ENTRY_POINT_GROUP, StashFactory, stashFactory, stashTypes
from ._context import StashContext, unavailable

__all__ = ["ENTRY_POINT_GROUP", "StashContext", "StashFactory", "stashFactory", "stashTypes", "unavailable"]
