"""
The pipeline in batches: the requests that reach the front queue in one turn
are delivered, committed and recorded together (ContainerHarness(batches=True),
where a turn ends when the clock moves).
"""

from __future__ import annotations

from pathlib import Path

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from apicontainer.pipeline._worker import StashWorker
from apicontainer.testing import BatchMemoryStash, ContainerHarness, MemoryStash, contractUOW
from apicontainer.uow import Verdict


class BatchTests(SynchronousTestCase):
    def build(self, *stashes: MemoryStash) -> ContainerHarness:
        self.dataDir = Path(self.mktemp())
        return ContainerHarness(self.dataDir, stashes, batches=True)

    def sendAll(self, h: ContainerHarness, *keys: str) -> list[Deferred]:
        """
        Send a PUT of each key in one turn, and end the turn.
        """
        received = [h.send("PUT", key, key.encode()) for key in keys]
        h.clock.advance(0)
        return received

    def codes(self, h: ContainerHarness, received: list[Deferred]) -> list[int]:
        return [h.result(r).code for r in received]

    def test_oneCallPerStashForABatch(self) -> None:
        """
        Three requests in one turn: one stashBatch and one commitBatch call
        on a stash that takes batches, a call per UOW on one that does not;
        all are stored and their spool files gone.
        """
        a, b = BatchMemoryStash("a"), MemoryStash("b")
        h = self.build(a, b)
        received = self.sendAll(h, "/items/1", "/items/2", "/items/3")
        self.assertEqual(self.codes(h, received), [200, 200, 200])
        self.assertEqual(a.batches, [("stashBatch", (1, 2, 3)), ("commitBatch", (1, 2, 3))])
        self.assertEqual(b.calls, [("stash", n) for n in (1, 2, 3)] + [("commit", n) for n in (1, 2, 3)])
        self.assertEqual(a.bodies(), {"/items/1": b"/items/1", "/items/2": b"/items/2", "/items/3": b"/items/3"})
        self.assertEqual([h.admin("GET", f"/_uow/{n}").json()["state"] for n in (1, 2, 3)], ["stored"] * 3)
        self.assertEqual(list((self.dataDir / "spool").iterdir()), [])

    def test_idempotencyKeysOfABatch(self) -> None:
        """
        Requests of one batch with Idempotency-Keys: once stored, a resend
        of either gets its first answer again, and makes no new UOW.
        """
        a = BatchMemoryStash("a")
        h = self.build(a)
        first = [h.send("PUT", f"/items/{n}", b"x", {"Idempotency-Key": f"k{n}"}) for n in (1, 2)]
        h.clock.advance(0)
        answers = [h.result(r) for r in first]
        again = h.send("PUT", "/items/2", b"x", {"Idempotency-Key": "k2"})
        h.clock.advance(0)
        replay = h.result(again)
        self.assertEqual((replay.code, replay.json()), (200, answers[1].json()))
        self.assertEqual(a.batches, [("stashBatch", (1, 2)), ("commitBatch", (1, 2))])

    def test_withoutBatchesEachAlone(self) -> None:
        """
        Without C{batches}, each request goes on its own, at once (a batch
        of one, which commits with C{commit}).
        """
        a = BatchMemoryStash("a")
        h = ContainerHarness(self.mktemp(), [a])
        received = [h.send("PUT", key, b"x") for key in ("/items/1", "/items/2")]
        self.assertEqual(self.codes(h, received), [200, 200])
        self.assertEqual(a.batches, [("stashBatch", (1,)), ("stashBatch", (2,))])
        self.assertEqual(a.calls, [("stash", 1), ("commit", 1), ("stash", 2), ("commit", 2)])

    def test_sameKeyWaitsForTheBatch(self) -> None:
        """
        A second UOW on a key of the batch is left out of it, and settled
        after the first, in UOW order.
        """
        a = BatchMemoryStash("a")
        h = self.build(a)
        sends = (("/items/1", b"first"), ("/items/2", b"x"), ("/items/1", b"second"))
        received = [h.send("PUT", key, body) for key, body in sends]
        h.clock.advance(0)
        self.assertEqual(self.codes(h, received), [200, 200, 200])
        self.assertEqual(a.batches, [("stashBatch", (1, 2)), ("commitBatch", (1, 2)), ("stashBatch", (3,))])
        self.assertEqual(a.calls[-1], ("commit", 3))  # one UOW: its own commit
        self.assertEqual(a.bodies()["/items/1"], b"second")

    def test_oneRefusedTheOthersStored(self) -> None:
        """
        A UOW of the batch that one stash refuses is rolled back on the
        others and answered with the refusal; the rest of the batch is
        stored and committed.
        """
        a, b = BatchMemoryStash("a"), BatchMemoryStash("b")
        refuse = b.stash

        def picky(uow):  # type: ignore[no-untyped-def]
            if uow.key == "/items/2":
                b.calls.append(("stash", uow.id))
                return Deferred.fromCoroutine(_now(Verdict.failed(422, "no")))
            return refuse(uow)

        b.stash = picky  # type: ignore[method-assign]
        h = self.build(a, b)
        received = self.sendAll(h, "/items/1", "/items/2", "/items/3")
        self.assertEqual(self.codes(h, received), [200, 422, 200])
        self.assertEqual(a.batches, [("stashBatch", (1, 2, 3)), ("commitBatch", (1, 3))])
        self.assertIn(("rollback", 2), a.calls)
        self.assertNotIn(("rollback", 2), b.calls)
        self.assertEqual(sorted(a.bodies()), ["/items/1", "/items/3"])
        self.assertEqual(h.admin("GET", "/_uow/2").json()["state"], "rejected")

    def test_failedBatchCommitIsAskedAgainOneByOne(self) -> None:
        """
        A commitBatch that fails as a whole is followed, after the first
        commit retry's delay, by a commit of each UOW on that stash: all
        are stored.
        """
        a = BatchMemoryStash("a")
        h = self.build(a)
        original = a.commitBatch

        def failOnce(uows):  # type: ignore[no-untyped-def]
            a.commitBatch = original  # type: ignore[method-assign]
            a.batches.append(("commitBatch", tuple(u.id for u in uows)))
            return fail(OSError("the sync failed"))

        a.commitBatch = failOnce  # type: ignore[method-assign]
        received = self.sendAll(h, "/items/1", "/items/2")
        self.assertNoResult(received[0])
        h.clock.advance(0.1)
        self.assertEqual(self.codes(h, received), [200, 200])
        self.assertEqual(len(self.flushLoggedErrors(OSError)), 1)
        self.assertEqual(a.calls[-2:], [("commit", 1), ("commit", 2)])
        self.assertEqual(a.undo, {})

    def test_failedBatchStashIsUnavailableForEach(self) -> None:
        """
        A stashBatch call that fails as a whole is a 500 verdict for each of
        its UOWs: each is rolled back and queued for a retry.
        """
        a = BatchMemoryStash("a")
        a.failBatches = 1
        h = self.build(a)
        received = self.sendAll(h, "/items/1", "/items/2")
        self.assertEqual(self.codes(h, received), [500, 500])
        self.assertEqual(len(self.flushLoggedErrors(OSError)), 1)
        self.assertEqual([h.admin("GET", f"/_uow/{n}").json()["state"] for n in (1, 2)], ["queued", "queued"])
        self.assertEqual(a.documents, {})

    def test_aRecordThatFailsLeavesItsUOWUnsettled(self) -> None:
        """
        When the journal cannot make one final state of the batch durable,
        that UOW is unsettled (its spool file stays, it is re-driven); the
        others are stored.
        """
        a = BatchMemoryStash("a")
        h = self.build(a)
        journal = h.container.fanout._journal
        settleBatch = journal.settleBatch

        def oneFails(records):  # type: ignore[no-untyped-def]
            def second(outcomes: list) -> list:
                return [outcomes[0], Failure(OSError("disk gone")), *outcomes[2:]]

            return settleBatch(records).addCallback(second)

        journal.settleBatch = oneFails  # type: ignore[method-assign]
        received = self.sendAll(h, "/items/1", "/items/2")
        self.assertEqual([h.result(r).code for r in received], [200, 500])
        self.assertEqual(len(self.flushLoggedErrors(OSError)), 1)
        self.assertEqual(h.admin("GET", "/_uow/2").json()["state"], "unsettled")
        journal.settleBatch = settleBatch  # type: ignore[method-assign]
        h.clock.advance(5)
        self.assertEqual(h.admin("GET", "/_uow/2").json()["state"], "stored")


async def _now(verdict: Verdict) -> Verdict:
    return verdict


class BatchWorkerTests(SynchronousTestCase):
    """
    A stash worker's call of a stash that takes batches: whatever the stash
    does, a verdict for each UOW.
    """

    def call(self, stash: BatchMemoryStash, *keys: str, **kw: object) -> tuple[Clock, Deferred]:
        clock = Clock()
        worker = StashWorker(stash, clock, timeout=2.0, **kw)  # type: ignore[arg-type]
        uows = [contractUOW(n, b"x", key=key) for n, key in enumerate(keys, 1)]
        return clock, Deferred.fromCoroutine(worker.callBatch(uows))

    def test_timeoutIs504ForEach(self) -> None:
        stash = BatchMemoryStash("a", hang=True)
        clock, verdicts = self.call(stash, "/items/1", "/items/2")
        clock.advance(2.0)
        self.assertEqual([v.status for v in self.successResultOf(verdicts)], [504, 504])

    def test_wrongCountIs500ForEach(self) -> None:
        stash = BatchMemoryStash("a")
        stash.stashBatch = lambda uows: succeed([Verdict.stored()])  # type: ignore[method-assign]
        _, verdicts = self.call(stash, "/items/1", "/items/2")
        self.assertEqual([v.status for v in self.successResultOf(verdicts)], [500, 500])

    def test_partDecidedWithoutTheStash(self) -> None:
        """
        With C{part}, a UOW without it is declined and only the others go
        to the stash, in one call.
        """
        stash = BatchMemoryStash("a")
        _, verdicts = self.call(stash, "/items/1", "/items/2", part="image")
        self.assertEqual([v.kind.value for v in self.successResultOf(verdicts)], ["declined", "declined"])
        self.assertEqual(stash.batches, [])
