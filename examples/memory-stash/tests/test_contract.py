"""
The example stash, built by its factory as the server builds it, keeps the
stash contract.
"""

from types import SimpleNamespace

from twisted.trial.unittest import SynchronousTestCase

from apicontainer.config import Section
from apicontainer.testing import StashContractTests
from apicontainer_memory import fromConfig


class MemoryStashContract(StashContractTests, SynchronousTestCase):
    def makeStash(self):  # type: ignore[no-untyped-def]
        spec = SimpleNamespace(name="scratch", options=Section(None, "stashes.scratch", "<test>", 1))
        return fromConfig(spec, None)
