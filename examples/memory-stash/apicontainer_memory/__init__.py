"""
An example third-party stash: documents kept in the server's memory.

It shows the three things a stash package needs: a factory that reads its
options through the spec (so that errors name the key and line), an entry
point in the C{apicontainer.stashes} group (see setup.cfg), and a test that
runs the stash contract kit (see tests/). Nothing it holds survives a
restart: use it for demonstrations and tests, not for data.
"""

from __future__ import annotations

from typing import Any

from apicontainer.testing import MemoryStash


def fromConfig(spec: Any, context: Any) -> MemoryStash:
    """
    Build the stash. Its one option, C{fail_with}, makes every write fail
    with that status (to try out rollbacks).
    """
    failWith = spec.options.integer("fail_with", 0)
    return MemoryStash(spec.name, failWith=failWith or None)
