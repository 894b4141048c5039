"""
Stashes: the destinations a UOW is delivered to.

The built-in types (C{sqlite}, C{filesystem}, C{postgres}, C{redis},
C{http}) live in this package's private modules and are found by name
(L{apicontainer.config.stashFactory}); another package adds its own type
through the entry point group C{apicontainer.stashes}. A factory is given
the stash's L{apicontainer.config.StashSpec} and a L{StashContext}.

This face imports no more than a stash needs: the filesystem stash's child
process imports it, and every module it holds costs that process memory
and garbage-collector time.
"""

from ._context import ForeignNumbering, StashContext, claimProblem, released, unavailable

__all__ = ["ForeignNumbering", "StashContext", "claimProblem", "released", "unavailable"]
