"""
Nothing vanishes: the retry engine, crash recovery, Idempotency-Key and the
state store, on a fake clock.
"""

from __future__ import annotations

import os
from pathlib import Path

from twisted.internet.defer import Deferred
from twisted.logger import LogLevel, capturedLogs
from twisted.trial.unittest import SynchronousTestCase

from apicontainer.blocking import inline
from apicontainer.storage._failqueue import RetryPolicy
from apicontainer.storage._spoolfile import encode
from apicontainer.storage._states import StateRecord, StateStore
from apicontainer.testing import ContainerHarness, MemoryStash
from apicontainer.uow import Status, UnitOfWork

POLICY = RetryPolicy(initial=1, factor=2, maxDelay=8, maxAttempts=4)


class HarnessTestCase(SynchronousTestCase):
    def build(self, *stashes: MemoryStash, **kw: object) -> ContainerHarness:
        self.dataDir = Path(self.mktemp())
        kw.setdefault("retry", POLICY)
        return ContainerHarness(self.dataDir, stashes, **kw)  # type: ignore[arg-type]

    def reopen(self, *stashes: MemoryStash, **kw: object) -> ContainerHarness:
        """
        A new container on the same data directory: a restart.
        """
        kw.setdefault("retry", POLICY)
        return ContainerHarness(self.dataDir, stashes, **kw)  # type: ignore[arg-type]

    def spooled(self) -> list[str]:
        return sorted(os.listdir(self.dataDir / "spool"))


class RetryTests(HarnessTestCase):
    """
    The fail queue drains by itself once the destination is back.
    """

    def test_outcomeLogLevels(self) -> None:
        """
        A UOW queued for a retry is logged as a warning with its report; its
        retry that ends stored at info; a first attempt that ends stored only
        at debug, since the access log has a line for it already.
        """
        b = MemoryStash("b", failWith=503)
        h = self.build(MemoryStash("a"), b)
        with capturedLogs() as events:
            self.assertEqual(h.request("PUT", "/items/1", b"x").code, 503)
            b.failWith = None
            h.clock.advance(1)
            first = h.request("PUT", "/items/2", b"y")
        self.assertEqual(first.code, 200)
        outcomes = [e for e in events if e.get("log_format", "").startswith("UOW {uow}")]
        self.assertEqual(
            [(e["uow"], e["state"], e["log_level"]) for e in outcomes],
            [
                (1, "queued", LogLevel.warn),
                (1, "stored", LogLevel.info),
                (first.json()["uow"], "stored", LogLevel.debug),
            ],
        )
        self.assertEqual(outcomes[0]["report"]["stashes"]["b"]["status"], 503)

    def test_scheduleAndDrain(self) -> None:
        """
        A 5xx UOW is retried after 1, 2, 4 seconds while the stash still
        fails, then stored once it recovers: both stashes hold it, the entry
        and the spool file are gone, and its final state is stored.
        """
        a, b = MemoryStash("a"), MemoryStash("b", failWith=503)
        h = self.build(a, b)
        self.assertEqual(h.request("PUT", "/items/1", b"x").code, 503)
        attempts = lambda: b.calls.count(("stash", 1))  # noqa: E731
        self.assertEqual(attempts(), 1)
        for delay, expected in ((1, 2), (2, 3)):
            h.clock.advance(delay - 0.01)
            self.assertEqual(attempts(), expected - 1)
            h.clock.advance(0.01)
            self.assertEqual(attempts(), expected)
        self.assertEqual(h.container.failQueue.get(1).attempts, 3)
        b.failWith = None
        h.clock.advance(4)
        self.assertEqual(h.container.failQueue.list(), [])
        self.assertEqual(self.spooled(), [])
        self.assertEqual((a.bodies(), b.bodies()), ({"/items/1": b"x"}, {"/items/1": b"x"}))
        record = self.successResultOf(h.container.states.get(1))
        self.assertEqual(record.state, Status.stored)
        self.assertEqual(h.admin("GET", "/_uow/1").json()["state"], "stored")

    def test_parkAfterMaxAttempts(self) -> None:
        """
        After max_attempts the UOW parks: kept with its spool file, no longer
        retried, and raised as an alarm on /_health.
        """
        b = MemoryStash("b", failWith=503)
        h = self.build(b)
        h.request("PUT", "/items/1", b"x")
        h.clock.pump([1, 2, 4, 8, 8, 8])
        [entry] = h.container.failQueue.list()
        self.assertEqual((entry.state, entry.attempts), (Status.parked, 4))
        stashCalls = len(b.calls)
        h.clock.pump([60] * 5)
        self.assertEqual(len(b.calls), stashCalls)
        self.assertEqual(self.spooled(), ["00000000000000000001.uow"])
        health = h.admin("GET", "/_health").json()
        self.assertEqual(health["status"], "attention")
        self.assertIn("1 UOW(s) parked", health["alarms"][0])
        self.assertEqual([e["uow"] for e in h.admin("GET", "/_failed?state=parked").json()["failed"]], [1])

    def test_operatorRetry(self) -> None:
        """
        POST /_failed/<id>/retry retries a parked UOW at once and answers
        with the outcome.
        """
        b = MemoryStash("b", failWith=503)
        h = self.build(b)
        h.request("PUT", "/items/1", b"x")
        h.clock.pump([1, 2, 4])
        self.assertEqual(h.container.failQueue.get(1).state, Status.parked)
        b.failWith = None
        response = h.admin("POST", "/_failed/1/retry")
        self.assertEqual((response.code, response.json()["state"]), (200, "stored"))
        self.assertEqual(b.bodies(), {"/items/1": b"x"})
        self.assertEqual(h.admin("POST", "/_failed/1/retry").code, 404)

    def test_retryEndingIn4xxIsRejected(self) -> None:
        """
        A retry that gets a 4xx ends the UOW as rejected and forgets it.
        """
        b = MemoryStash("b", failWith=503)
        h = self.build(b)
        h.request("PUT", "/items/1", b"x")
        b.failWith = 422
        h.clock.advance(1)
        self.assertEqual(h.container.failQueue.list(), [])
        self.assertEqual(self.spooled(), [])
        self.assertEqual(self.successResultOf(h.container.states.get(1)).state, Status.rejected)

    def test_failedRollbackIsRetriedThenStuck(self) -> None:
        """
        A rejected UOW whose rollback fails has only its rollback retried;
        it ends rejected once the rollback works, or stuck after max_attempts.
        """
        a, b = MemoryStash("a", failRollback=True), MemoryStash("b", failWith=400)
        h = self.build(a, b)
        h.request("PUT", "/items/1", b"x")
        self.assertEqual(a.bodies(), {"/items/1": b"x"})
        h.clock.pump([1, 2])
        self.assertEqual(b.calls.count(("stash", 1)), 1, "a compensation retry must not re-stash")
        a.failRollback = False
        h.clock.advance(4)
        self.assertEqual(a.bodies(), {})
        self.assertEqual(h.container.failQueue.list(), [])
        self.assertEqual(self.successResultOf(h.container.states.get(1)).state, Status.rejected)
        self.flushLoggedErrors(OSError)

        a2, b2 = MemoryStash("a", failRollback=True), MemoryStash("b", failWith=400)
        h2 = self.build(a2, b2)
        h2.request("PUT", "/items/1", b"x")
        h2.clock.pump([1, 2, 4, 8])
        self.assertEqual(h2.container.failQueue.get(1).state, Status.stuck)
        self.assertEqual(self.spooled(), ["00000000000000000001.uow"])
        self.flushLoggedErrors(OSError)

    def test_retryNeverOverwritesNewer(self) -> None:
        """
        A queued UOW whose key got a newer stored UOW meanwhile is rolled
        back when retried, not applied: the newer write stays.
        """
        a, b = MemoryStash("a"), MemoryStash("b", failWith=503)
        h = self.build(a, b)
        h.request("PUT", "/items/1", b"old")
        b.failWith = None
        self.assertEqual(h.request("PUT", "/items/1", b"new").code, 200)
        h.clock.advance(1)
        self.assertEqual((a.bodies(), b.bodies()), ({"/items/1": b"new"}, {"/items/1": b"new"}))
        self.assertEqual(self.successResultOf(h.container.states.get(1)).state, Status.superseded)
        self.assertEqual(h.container.failQueue.list(), [])

    def test_retriesInUOWOrderPerKey(self) -> None:
        """
        Two queued UOWs on one key are retried oldest first, one at a time:
        the newer one's write is what stays.
        """
        journal: list[tuple[str, str, int]] = []
        a = MemoryStash("a", failWith=503, journal=journal)
        h = self.build(a)
        h.request("PUT", "/items/1", b"one")
        h.request("PUT", "/items/1", b"two")
        a.failWith = None
        h.clock.advance(1)
        self.assertEqual(a.bodies(), {"/items/1": b"two"})
        stashes = [uow for name, method, uow in journal if method == "stash"]
        self.assertEqual(stashes, [1, 2, 1, 2])


class RecoveryTests(HarnessTestCase):
    """
    On start, every spooled UOW without a final state is settled.
    """

    def spoolByHand(self, uowId: int, key: str = "/items/1", body: bytes = b"x") -> None:
        """
        Leave a spool file as a crash after the spool write would.
        """
        uow = UnitOfWork(id=uowId, method="PUT", key=key, route="/items/<id>", body=body, attempt=uowId)
        (self.dataDir / "spool" / f"{uowId:020d}.uow").write_bytes(b"".join(encode(uow)))

    def test_redriveInOrder(self) -> None:
        """
        Spool files left behind are re-driven in UOW order before the
        container takes requests; recovery run again does nothing.
        """
        self.build(MemoryStash("a"))
        self.spoolByHand(5, body=b"five")
        self.spoolByHand(6, body=b"six")
        self.spoolByHand(7, key="/items/2", body=b"seven")
        a = MemoryStash("a")
        h = self.reopen(a)
        self.assertEqual(a.bodies(), {"/items/1": b"six", "/items/2": b"seven"})
        self.assertEqual([uow for m, uow in a.calls if m == "stash"], [5, 6, 7])
        self.assertEqual(self.spooled(), [])
        self.assertTrue(h.container.recovered)
        again = MemoryStash("a")
        self.reopen(again)
        self.assertEqual(again.calls, [])

    def test_halfAppliedIsCompletedOrRolledBack(self) -> None:
        """
        A UOW a crash left stored in one stash only ends in both (recovery
        re-drives it) or, when the other fails, in neither.
        """
        self.build(MemoryStash("a"), MemoryStash("b"))
        self.spoolByHand(1)
        a = MemoryStash("a")
        a.stash(UnitOfWork(id=1, method="PUT", key="/items/1", route="/items/<id>", body=b"x", attempt=1))
        b = MemoryStash("b")
        self.reopen(a, b)
        self.assertEqual((a.bodies(), b.bodies()), ({"/items/1": b"x"}, {"/items/1": b"x"}))

        self.build(MemoryStash("a"), MemoryStash("b"))
        self.spoolByHand(1)
        a = MemoryStash("a")
        a.stash(UnitOfWork(id=1, method="PUT", key="/items/1", route="/items/<id>", body=b"x", attempt=1))
        b = MemoryStash("b", failWith=503)
        h = self.reopen(a, b)
        self.assertEqual((a.bodies(), b.bodies()), ({}, {}))
        self.assertEqual([e.uow for e in h.container.failQueue.list()], [1])

    def test_redriveAfterRolledBackAttempt(self) -> None:
        """
        A crash after a rollback but before the fail queue write leaves
        rolled-back markers in the stashes; the re-drive, under a fresh
        attempt id, still stores instead of being declined as a late call.
        """
        self.build(MemoryStash("a"))
        self.spoolByHand(1)
        a = MemoryStash("a")
        first = UnitOfWork(id=1, method="PUT", key="/items/1", route="/items/<id>", body=b"x", attempt=1)
        a.stash(first)
        a.rollback(first)
        self.reopen(a)
        self.assertEqual(a.bodies(), {"/items/1": b"x"})
        self.assertEqual(self.spooled(), [])

    def test_corruptQuarantined(self) -> None:
        """
        A torn spool file is quarantined, never replayed.
        """
        self.build(MemoryStash("a"))
        self.spoolByHand(3)
        path = self.dataDir / "spool" / f"{3:020d}.uow"
        path.write_bytes(path.read_bytes()[:-1])
        a = MemoryStash("a")
        self.reopen(a)
        self.assertEqual(a.calls, [])
        self.assertEqual(os.listdir(self.dataDir / "quarantine"), [f"{3:020d}.uow"])
        self.flushLoggedErrors()

    def test_finalStateOnlyCleansUp(self) -> None:
        """
        A spool file and fail queue entry whose UOW already has a final state
        (a crash between recording it and cleaning up) are removed, not
        re-driven.
        """
        h = self.build(MemoryStash("a", failWith=503))
        h.request("PUT", "/items/1", b"x")
        self.successResultOf(
            h.container.states.record(
                StateRecord(1, "/items/1", "/items/<id>", Status.stored, 200, None, None, None, 0.0)
            )
        )
        a = MemoryStash("a")
        h2 = self.reopen(a)
        self.assertEqual(a.calls, [])
        self.assertEqual(self.spooled(), [])
        self.assertEqual(h2.container.failQueue.list(), [])

    def test_queuedStayForRetryEngine(self) -> None:
        """
        A UOW in the fail queue is left to the retry engine, which stores it
        once the destination is back.
        """
        h = self.build(MemoryStash("a", failWith=503))
        h.request("PUT", "/items/1", b"x")
        a = MemoryStash("a")
        h2 = self.reopen(a)
        self.assertEqual([e.uow for e in h2.container.failQueue.list()], [1])
        h2.clock.advance(1)
        self.assertEqual(a.bodies(), {"/items/1": b"x"})
        self.assertEqual(h2.container.failQueue.list(), [])


class IdempotencyTests(HarnessTestCase):
    """
    Idempotency-Key: one UOW per key, whatever the repeats.
    """

    def put(self, h: ContainerHarness, body: bytes, key: str = "key-1") -> object:
        return h.request("PUT", "/items/1", body, {"idempotency-key": key})

    def test_repeatGetsFirstResult(self) -> None:
        """
        A repeat with the same key and payload gets the first result and UOW
        id, marked as replayed, without a second UOW; across a restart too.
        """
        a = MemoryStash("a")
        h = self.build(a)
        first = self.put(h, b"x")
        again = self.put(h, b"x")
        self.assertEqual((again.code, again.json()), (first.code, first.json()))  # type: ignore[attr-defined]
        self.assertEqual(again.header("idempotent-replayed"), "true")  # type: ignore[attr-defined]
        self.assertEqual([m for m, _ in a.calls], ["stash", "commit"])
        later = self.put(self.reopen(MemoryStash("a")), b"x")
        self.assertEqual(later.json()["uow"], first.json()["uow"])  # type: ignore[attr-defined]

    def test_otherPayloadIs422(self) -> None:
        """
        The same key with another payload is 422 and changes nothing.
        """
        a = MemoryStash("a")
        h = self.build(a)
        self.put(h, b"x")
        response = self.put(h, b"y")
        self.assertEqual((response.code, response.json()["error"]), (422, "idempotency_key"))  # type: ignore[attr-defined]
        self.assertEqual(a.bodies(), {"/items/1": b"x"})

    def test_refusedSpoolingFreesTheKey(self) -> None:
        """
        A request whose spooling failed (a full disk) holds no claim on its
        key: its repeat is a new request, not a 409.
        """
        import errno
        from unittest import mock

        a = MemoryStash("a")
        h = self.build(a)
        with mock.patch("apicontainer.storage._durable.os.writev", side_effect=OSError(errno.ENOSPC, "No space left on device")):
            refused = self.put(h, b"x")
        self.assertEqual(refused.code, 503)  # type: ignore[attr-defined]
        again = self.put(h, b"x")
        self.assertEqual((again.code, again.json()["outcome"]), (200, "stored"))  # type: ignore[attr-defined]
        self.assertEqual(a.bodies(), {"/items/1": b"x"})

    def test_inFlightIs409(self) -> None:
        """
        A repeat while the first is still under way is 409; the key is free
        for its result once the first settles.
        """
        a = MemoryStash("a", hang=True)
        h = self.build(a, timeout=5.0)
        first = h.send("PUT", "/items/1", b"x", {"idempotency-key": "k"})
        self.assertEqual(self.put(h, b"x", "k").code, 409)  # type: ignore[attr-defined]
        h.clock.advance(5)
        self.assertEqual(h.result(first).code, 504)
        replay = self.put(h, b"x", "k")
        self.assertEqual((replay.code, replay.header("location")), (504, "/_uow/1"))  # type: ignore[attr-defined]

    def test_badKeys(self) -> None:
        """
        Empty, overlong and non-ASCII keys are 400 before anything is spooled.
        """
        h = self.build(MemoryStash("a"))
        for key in ("", "x" * 256, "caf\u00e9", "a b"):
            response = h.request("PUT", "/items/1", b"x", {"idempotency-key": key})
            self.assertEqual((response.code, response.json()["error"]), (400, "bad_idempotency_key"), key)
        self.assertEqual(self.spooled(), [])

    def test_droppedIs410(self) -> None:
        """
        A repeat of a request an operator dropped is 410.
        """
        h = self.build(MemoryStash("a", failWith=503))
        self.put(h, b"x")
        self.assertEqual(h.admin("DELETE", "/_failed/1").code, 200)
        self.assertEqual(self.put(h, b"x").code, 410)  # type: ignore[attr-defined]

    def test_retention(self) -> None:
        """
        After idempotency.retention_s the key's result is forgotten and the
        key may be used afresh.
        """
        from attrs import evolve

        h = self.build(MemoryStash("a"))
        h.container.config = evolve(h.container.config, idempotencyRetention=100.0)
        self.put(h, b"x")
        h.clock.advance(3600 * 2)
        self.assertIsNone(self.successResultOf(h.container.states.byIdempotencyKey("key-1")))


class StateStoreTests(SynchronousTestCase):
    """
    Final states are written with group commit.
    """

    def test_groupCommit(self) -> None:
        """
        Records that arrive while a batch is being written share the next
        transaction; every caller hears once its own batch is durable.
        """
        calls: list[Deferred[None]] = []
        writes: list[int] = []

        def held(f, *args):  # type: ignore[no-untyped-def]
            waiting: Deferred[None] = Deferred()
            calls.append(waiting)
            return waiting.addCallback(lambda _: f(*args))

        store = StateStore(Path(self.mktemp()), held)
        store.open()
        realBatch = store.runBatch
        store._group._runBatch = lambda operations: (writes.append(len(operations)), realBatch(operations))[1]  # type: ignore[method-assign]
        record = lambda n: StateRecord(n, "/k", "/k", Status.stored, 200, None, None, None, 0.0)  # noqa: E731
        done = [store.record(record(n)) for n in range(1, 5)]
        self.assertEqual(len(calls), 1)
        calls[0].callback(None)
        self.assertEqual(len(calls), 2)
        self.assertNoResult(done[1])
        calls[1].callback(None)
        for d in done:
            self.successResultOf(d)
        self.assertEqual(writes, [1, 3])
        store._blocking = inline
        self.assertEqual(len(calls), 2)
        self.assertEqual(self.successResultOf(store.lastStored("/k")), 4)

    def test_thenRunsOnceDurable(self) -> None:
        """
        A record's C{then} runs once the record is committed (another
        connection sees it), and the record's Deferred fires with what it
        returned; if C{then} raises, the Deferred fails with its error, and
        the record stays.
        """
        import sqlite3

        path = Path(self.mktemp())
        store = StateStore(path, inline)
        store.open()
        seen: list[int] = []

        def then() -> str:
            other = sqlite3.connect(path)
            seen.append(other.execute("SELECT count(*) FROM uows").fetchone()[0])
            other.close()
            return "removed"

        def broken() -> None:
            raise OSError("no such file")

        record = lambda n: StateRecord(n, "/k", "/k", Status.stored, 200, None, None, None, 0.0)  # noqa: E731
        self.assertEqual(self.successResultOf(store.record(record(1), then=then)), "removed")
        self.assertEqual(seen, [1])
        self.failureResultOf(store.record(record(2), then=broken), OSError)
        self.assertEqual(self.successResultOf(store.lastStored("/k")), 2)


class ShutdownTests(HarnessTestCase):
    """
    On stop, UOWs under way get limits.shutdown_grace_s to finish; the rest
    stay spooled for recovery.
    """

    def test_drainWaitsForUnderway(self) -> None:
        """
        A UOW that finishes within the grace is waited for.
        """
        a = MemoryStash("a", hang=True)
        h = self.build(a, timeout=3.0)
        h.send("PUT", "/items/1", b"x")
        draining = Deferred.fromCoroutine(h.container.drain(10.0))
        self.assertNoResult(draining)
        h.clock.advance(3)
        self.assertEqual(self.successResultOf(draining), 0)

    def test_drainGivesUpAtDeadline(self) -> None:
        """
        A UOW still under way at the deadline is left in the spool, and the
        next start settles it.
        """
        a = MemoryStash("a", hang=True)
        h = self.build(a, timeout=100.0)
        h.send("PUT", "/items/1", b"x")
        draining = Deferred.fromCoroutine(h.container.drain(5.0))
        h.clock.advance(5)
        self.assertEqual(self.successResultOf(draining), 1)
        self.assertEqual(self.spooled(), ["00000000000000000001.uow"])
        again = MemoryStash("a")
        self.reopen(again)
        self.assertEqual(again.bodies(), {"/items/1": b"x"})


class GroupCommitTests(SynchronousTestCase):
    """
    GroupCommit runs one batch at a time, also when callbacks submit more.
    """

    def test_reentrantSubmitStartsOneBatch(self) -> None:
        """
        Work submitted from a callback of a finished batch starts the next
        batch, and no second batch runs beside it.
        """
        from apicontainer.storage._groupcommit import GroupCommit, each

        running: list[Deferred[None]] = []
        batches: list[int] = []
        overlaps: list[int] = []

        def held(f, *args):  # type: ignore[no-untyped-def]
            if any(not d.called for d in running):
                overlaps.append(len(running))
            waiting: Deferred[None] = Deferred()
            running.append(waiting)
            return waiting.addCallback(lambda _: f(*args))

        def runBatch(operations):  # type: ignore[no-untyped-def]
            batches.append(len(operations))
            return each(operations, lambda operation: operation[0](*operation[1]))

        group = GroupCommit(held, runBatch)
        group.submit(lambda: 0)
        first, second = group.submit(lambda: 1), group.submit(lambda: 2)
        first.addCallback(lambda _: group.submit(lambda: 3))
        second.addCallback(lambda _: group.submit(lambda: 4))
        for index in range(3):
            running[index].callback(None)
        self.assertEqual((batches, overlaps), ([1, 2, 1], []))
        running[3].callback(None)
        self.assertEqual((batches, overlaps), ([1, 2, 1, 1], []))
