"""
Fakes and a harness for unit tests of stashes and of whole pipelines.

Shipped for users: a test of your own stash, or of a configuration, drives
UOWs through a real pipeline on a L{twisted.internet.task.Clock}, without
sockets, threads or real time::

    from twisted.trial.unittest import SynchronousTestCase
    from apicontainer.testing import ContainerHarness, MemoryStash

    class MyTests(SynchronousTestCase):
        def test_write(self):
            records = MemoryStash("records")
            harness = ContainerHarness(self.mktemp(), [records])
            response = harness.request("PUT", "/items/1", b"{}")
            self.assertEqual(response.code, 200)
            self.assertEqual(records.documents["/items/1"].body, b"{}")
"""

from ._backends import FAILQUEUE_CONTRACT, SPOOL_CONTRACT, openSpool
from ._contract import (
    BATCH_CONTRACT,
    CONTRACT,
    INTERLEAVING_KEYS,
    StashContractTests,
    checkInterleaving,
    checkPruneForgetsOnlyOldMarkers,
    checkRefusalStoresNothing,
    contractUOW,
    interleavings,
    randomInterleavings,
)
from ._harness import ContainerHarness, HarnessResponse
from ._memory import BatchMemoryStash, MemoryStash
from ._natscluster import NATSCluster, natsServerBinary

__all__ = [
    "BATCH_CONTRACT",
    "CONTRACT",
    "FAILQUEUE_CONTRACT",
    "SPOOL_CONTRACT",
    "ContainerHarness",
    "HarnessResponse",
    "INTERLEAVING_KEYS",
    "BatchMemoryStash",
    "MemoryStash",
    "NATSCluster",
    "StashContractTests",
    "checkInterleaving",
    "checkPruneForgetsOnlyOldMarkers",
    "checkRefusalStoresNothing",
    "contractUOW",
    "interleavings",
    "natsServerBinary",
    "openSpool",
    "randomInterleavings",
]
