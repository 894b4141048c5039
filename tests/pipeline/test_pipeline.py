"""
The whole pipeline on a fake clock: ingress, spool, front queue, fanout,
stash workers, rollback and fail queue, through apicontainer.testing.
"""

from __future__ import annotations

import errno
import hashlib
import os
from pathlib import Path
from unittest import mock

from twisted.trial.unittest import SynchronousTestCase

from apicontainer.config import Limits
from apicontainer.pipeline._stashcalls import CommitFailed
from apicontainer.storage._failqueue import RetryPolicy
from apicontainer.testing import ContainerHarness, MemoryStash
from apicontainer.uow import Verdict
from apicontainer.web._auth import BearerTokens


class PipelineTestCase(SynchronousTestCase):
    def build(self, *stashes: MemoryStash, **kw: object) -> ContainerHarness:
        self.dataDir = Path(self.mktemp())
        return ContainerHarness(self.dataDir, stashes, **kw)  # type: ignore[arg-type]

    def assertRefused(self, response: object, code: int, error: str) -> None:
        self.assertEqual((response.code, response.json()["error"]), (code, error))  # type: ignore[attr-defined]
        self.assertEqual(response.header("content-type"), "application/json")  # type: ignore[attr-defined]
        self.assertEqual(self.spooled(), [])

    def spooled(self) -> list[str]:
        """
        Every file in the spool directory, temporary ones included.
        """
        return sorted(os.listdir(self.dataDir / "spool"))


class OutcomeTests(PipelineTestCase):
    """
    Each combination of verdicts settles as docs/http.md says.
    """

    def test_storedEverywhere(self) -> None:
        """
        All stashes store: 200, the exact response body of the design, the
        write in both, the spool file deleted, commit sent to each.
        """
        a, b = MemoryStash("a"), MemoryStash("b")
        h = self.build(a, b)
        response = h.request("PUT", "/items/1", b'{"n": 1}', {"content-type": "application/json"})
        self.assertEqual(response.code, 200)
        self.assertEqual(
            response.json(),
            {
                "uow": 1,
                "outcome": "stored",
                "stashes": {
                    "a": {"verdict": "stored", "status": 200},
                    "b": {"verdict": "stored", "status": 200},
                },
            },
        )
        self.assertEqual(a.bodies(), {"/items/1": b'{"n": 1}'})
        self.assertEqual(b.bodies(), {"/items/1": b'{"n": 1}'})
        self.assertEqual(a.calls, [("stash", 1), ("commit", 1)])
        self.assertEqual(self.spooled(), [])
        self.assertEqual(h.container.failQueue.list(), [])

    def test_spoolRemovalFails(self) -> None:
        """
        A spool file that cannot be removed is logged, and the UOW is
        stored and answered all the same: its final state is durable, and
        recovery removes the file at the next start.
        """
        h = self.build(MemoryStash("a"))

        def remove(uowId: int, empty: bool = True) -> bool:
            raise PermissionError("read-only spool")

        h.container.spool.remove = remove  # type: ignore[method-assign]
        response = h.request("PUT", "/items/1", b"x")
        self.assertEqual(response.code, 200)
        self.assertEqual(len(self.flushLoggedErrors(PermissionError)), 1)
        self.assertEqual(self.spooled(), [h.container.spool.path(1).name])
        self.assertEqual(self.successResultOf(h.container.states.get(1)).state.value, "stored")

    def test_commitsRunTogether(self) -> None:
        """
        Every stash is told to commit at once: a slow commit in one does not
        hold back the others, and the answer waits for all of them.
        """
        from twisted.internet.defer import Deferred

        slow: list[Deferred[None]] = []

        class SlowCommit(MemoryStash):
            def commit(self, uow):  # type: ignore[no-untyped-def]
                self.calls.append(("commit", uow.id))
                waiting: Deferred[None] = Deferred()
                slow.append(waiting)
                return waiting

        a, b = SlowCommit("a"), MemoryStash("b")
        h = self.build(a, b)
        received = h.send("PUT", "/items/1", b"x")
        self.assertEqual(len(slow), 1)
        self.assertEqual(b.calls, [("stash", 1), ("commit", 1)])
        self.assertNoResult(received)
        slow[0].callback(None)
        self.assertEqual(h.result(received).code, 200)
        self.assertEqual(self.spooled(), [])

    def test_declineIsSuccess(self) -> None:
        """
        A declining stash does not stop the others from committing.
        """
        a, b = MemoryStash("a"), MemoryStash("b", decline=True)
        h = self.build(a, b)
        response = h.request("POST", "/items/1", b"x")
        self.assertEqual(response.code, 200)
        self.assertEqual(response.json()["stashes"]["b"], {"verdict": "declined", "status": 204, "detail": "told to decline"})
        self.assertEqual(a.bodies(), {"/items/1": b"x"})
        self.assertEqual(self.spooled(), [])

    def test_clientErrorRejects(self) -> None:
        """
        A 4xx rolls back every stash, answers that 4xx, queues nothing and
        deletes the spool file.
        """
        a, b = MemoryStash("a"), MemoryStash("b", failWith=422)
        h = self.build(a, b)
        h.request("PUT", "/items/1", b"old")
        b.failWith = 422
        response = h.request("PUT", "/items/1", b"new")
        self.assertEqual(response.code, 422)
        self.assertEqual(response.json()["outcome"], "rejected")
        self.assertEqual(response.json()["stashes"]["b"]["detail"], "told to fail")
        self.assertIsNone(response.header("location"))
        self.assertEqual(a.bodies(), {})
        self.assertIn(("rollback", 2), a.calls)
        self.assertNotIn(("rollback", 2), b.calls)
        self.assertEqual(self.spooled(), [])
        self.assertEqual(h.container.failQueue.list(), [])

    def test_refusingStashIsNotRolledBackOnAFirstAttempt(self) -> None:
        """
        A stash that refused the UOW's first attempt with a 4xx stored
        nothing: its rollback is not called, so a destination that refuses
        every write (and its rollbacks too) leaves a rejected UOW rejected,
        not queued.
        """
        records, down = MemoryStash("records"), MemoryStash("down", failWith=400, failRollback=True)
        h = self.build(records, down)
        response = h.request("PUT", "/items/1", b"x")
        self.assertEqual((response.code, response.json()["outcome"]), (400, "rejected"))
        self.assertEqual(down.calls, [("stash", 1)])
        self.assertIn(("rollback", 1), records.calls)
        self.assertEqual(records.bodies(), {})
        self.assertEqual((h.container.failQueue.list(), self.spooled()), ([], []))
        self.assertEqual(h.admin("GET", "/_uow/1").json()["state"], "rejected")

    def test_owedRollbackOfRefusingStashStillRuns(self) -> None:
        """
        A stash whose rollback failed in an earlier attempt (which may have
        written there) is rolled back after a later attempt's 4xx: that
        rollback is still owed.
        """
        a = MemoryStash("a", failWith=503, failAfterWrite=True, failRollback=True)
        h = self.build(a, retry=RetryPolicy(initial=1.0))
        self.assertEqual(h.request("PUT", "/items/1", b"x").code, 503)
        [entry] = h.container.failQueue.list()
        self.assertEqual(entry.rollbackFailed, ("a",))
        self.assertEqual(a.bodies(), {"/items/1": b"x"})
        a.failWith, a.failAfterWrite, a.failRollback = 400, False, False
        h.clock.advance(1.0)
        self.assertEqual(a.bodies(), {})
        self.assertEqual(a.calls[-2:], [("stash", 1), ("rollback", 1)])
        self.assertEqual(h.admin("GET", "/_uow/1").json()["state"], "rejected")
        self.assertEqual(len(self.flushLoggedErrors(OSError)), 1)

    def test_laterAttemptRollsBackARefusingStash(self) -> None:
        """
        A retry that a stash refuses with a 4xx rolls that stash back all
        the same: an earlier attempt, cut short by a crash after the stash
        stored it, left a write there that nothing else would undo.
        """
        a, b = MemoryStash("a", failWith=503), MemoryStash("b")
        h = self.build(a, b, retry=RetryPolicy(initial=1.0, factor=1.0))
        self.assertEqual(h.request("PUT", "/items/1", b"x").code, 503)
        a.failWith, a.hang = None, True
        h.clock.advance(1.0)  # the retry: b stores, a hangs; then the crash
        self.assertEqual(b.bodies(), {"/items/1": b"x"})
        a.hang, b.failWith = False, 422
        h = ContainerHarness(self.dataDir, [a, b], retry=RetryPolicy(initial=1.0, factor=1.0))
        h.clock.advance(1.0)
        self.assertEqual(h.admin("GET", "/_uow/1").json()["state"], "rejected")
        self.assertEqual((a.bodies(), b.bodies()), ({}, {}))
        self.assertEqual(b.calls[-2:], [("stash", 1), ("rollback", 1)])

    def test_firstClientErrorInConfigOrderWins(self) -> None:
        """
        With a 5xx and two 4xx, the answer is the 4xx of the first stash in
        configuration order.
        """
        h = self.build(MemoryStash("a", failWith=503), MemoryStash("b", failWith=409), MemoryStash("c", failWith=400))
        response = h.request("PUT", "/items/1", b"x")
        self.assertEqual((response.code, response.json()["outcome"]), (409, "rejected"))

    def test_serverErrorQueues(self) -> None:
        """
        A 5xx rolls back every stash to its before-image, answers the 5xx with
        Location, records the UOW in the fail queue and keeps its spool file.
        """
        a, b = MemoryStash("a"), MemoryStash("b")
        h = self.build(a, b)
        h.request("PUT", "/items/1", b"old")
        b.failWith = 503
        response = h.request("PUT", "/items/1", b"new")
        self.assertEqual(response.code, 503)
        self.assertEqual(response.json()["outcome"], "queued")
        self.assertEqual(response.header("location"), "/_uow/2")
        self.assertEqual(response.json()["stashes"]["b"], {"verdict": "failed", "status": 503})
        self.assertEqual(a.bodies(), {"/items/1": b"old"})
        self.assertEqual(self.spooled(), ["00000000000000000002.uow"])
        [entry] = h.container.failQueue.list()
        self.assertEqual((entry.uow, entry.state.value, entry.attempts), (2, "queued", 1))
        self.assertEqual(entry.report.verdicts["b"].detail, "told to fail")
        self.assertTrue((self.dataDir / "failed" / "00000000000000000002.json").exists())
        self.assertTrue((self.dataDir / entry.asJSON()["spool"]).exists())

    def test_failedHalfwayIsRolledBack(self) -> None:
        """
        A stash that wrote and then failed is rolled back too.
        """
        a, b = MemoryStash("a"), MemoryStash("b", failWith=500, failAfterWrite=True)
        h = self.build(a, b)
        response = h.request("PUT", "/items/1", b"x")
        self.assertEqual(response.code, 500)
        self.assertEqual(b.bodies(), {})
        self.assertEqual(a.bodies(), {})

    def test_rollbackInReverseConfigOrder(self) -> None:
        """
        Rollback goes to every stash, last configured first.
        """
        journal: list[tuple[str, str, int]] = []
        stashes = [MemoryStash(n, journal=journal) for n in "abc"]
        stashes[1].failWith = 503
        h = self.build(*stashes)
        h.request("PUT", "/items/1", b"x")
        rollbacks = [name for name, method, _ in journal if method == "rollback"]
        self.assertEqual(rollbacks, ["c", "b", "a"])

    def test_timeoutIs504(self) -> None:
        """
        A stash that does not answer within timeout_s gets a 504 verdict on
        the clock; the UOW is rolled back everywhere and queued.
        """
        a, b = MemoryStash("a"), MemoryStash("b", hang=True)
        h = self.build(a, b, timeout=5.0)
        pending = h.send("PUT", "/items/1", b"x")
        self.assertEqual(a.bodies(), {"/items/1": b"x"})
        h.clock.advance(4.9)
        h.flush()
        self.assertNoResult(pending)
        h.clock.advance(0.2)
        response = h.result(pending)
        self.assertEqual(response.code, 504)
        self.assertEqual(response.json()["stashes"]["b"]["status"], 504)
        self.assertEqual(a.bodies(), {})
        self.assertIn(("rollback", 1), b.calls)
        self.assertEqual(len(h.container.failQueue.list()), 1)

    def test_rollbackFailureKeepsRejectedUOW(self) -> None:
        """
        When a rollback of a rejected UOW fails, the UOW is kept, spool file
        and all, queued for its rollback to be retried.
        """
        a, b = MemoryStash("a", failRollback=True), MemoryStash("b", failWith=422)
        h = self.build(a, b)
        response = h.request("PUT", "/items/1", b"x")
        self.assertEqual(response.code, 422)
        [entry] = h.container.failQueue.list()
        self.assertEqual(
            (entry.state.value, entry.rollbackFailed, entry.compensate), ("queued", ("a",), True)
        )
        self.assertEqual(self.spooled(), ["00000000000000000001.uow"])
        self.assertEqual(len(self.flushLoggedErrors(OSError)), 1)

    def test_rollbackFailureOfQueuedUOW(self) -> None:
        """
        When a rollback of a 5xx UOW fails, the UOW is queued for its retry
        (which settles it one way or the other), naming the stash.
        """
        a, b = MemoryStash("a"), MemoryStash("b", failWith=503, failRollback=True)
        h = self.build(a, b)
        response = h.request("PUT", "/items/1", b"x")
        self.assertEqual(response.code, 503)
        [entry] = h.container.failQueue.list()
        self.assertEqual((entry.state.value, entry.rollbackFailed), ("queued", ("b",)))
        self.assertEqual(a.bodies(), {})
        self.assertEqual(len(self.flushLoggedErrors(OSError)), 1)

    def test_failedCommitIsRetried(self) -> None:
        """
        A commit that fails is asked again after a pause; once it commits,
        the UOW is stored as usual.
        """
        a, b = MemoryStash("a"), MemoryStash("b", failCommits=2)
        h = self.build(a, b)
        received = h.send("PUT", "/items/1", b"x")
        self.assertNoResult(received)
        h.clock.advance(0.1)
        self.assertNoResult(received)
        h.clock.advance(1.0)
        self.assertEqual(h.result(received).code, 200)
        self.assertEqual(b.calls, [("stash", 1), ("commit", 1), ("commit", 1), ("commit", 1)])
        self.assertEqual(a.calls, [("stash", 1), ("commit", 1)])
        self.assertEqual(self.spooled(), [])
        self.assertEqual(len(self.flushLoggedErrors(OSError)), 2)

    def test_commitThatKeepsFailingIsNever2xx(self) -> None:
        """
        A commit that still fails after its retries leaves the UOW unsettled:
        no 200 (its write may not be durable), no final state, its spool file
        stays, and the running server re-drives it after a backoff, without
        a restart, until it is stored.
        """
        a, b = MemoryStash("a"), MemoryStash("b", failCommits=3)
        h = self.build(a, b)
        received = h.send("PUT", "/items/1", b"x")
        h.clock.advance(0.1)
        h.clock.advance(1.0)
        response = h.result(received)
        self.assertEqual((response.code, response.json()["outcome"]), (500, "pending"))
        self.assertEqual(self.spooled(), ["00000000000000000001.uow"])
        self.assertEqual(h.admin("GET", "/_uow/1").json()["state"], "unsettled")
        health = h.admin("GET", "/_health").json()
        self.assertEqual((health["status"], health["unsettled"]), ("attention", 1))
        self.assertEqual(len(self.flushLoggedErrors(OSError)), 3)
        self.assertEqual(len(self.flushLoggedErrors(CommitFailed)), 1)
        h.clock.advance(1.0)
        self.assertEqual(h.admin("GET", "/_uow/1").json()["state"], "stored")
        self.assertEqual(b.calls[-2:], [("stash", 1), ("commit", 1)])
        self.assertEqual((b.undo, self.spooled()), ({}, []))
        self.assertEqual(h.admin("GET", "/_health").json()["status"], "ok")

    def test_requestTimeout(self) -> None:
        """
        A UOW still under way after request_timeout_s answers 504 pending with
        its Location; it settles later all the same.
        """
        a = MemoryStash("a", hang=True)
        h = self.build(a, timeout=100.0, limits=Limits(requestTimeout=10.0))
        pending = h.send("PUT", "/items/1", b"x")
        h.clock.advance(10)
        response = h.result(pending)
        self.assertEqual((response.code, response.json()["outcome"]), (504, "pending"))
        self.assertEqual(response.header("location"), "/_uow/1")
        self.assertEqual(h.admin("GET", "/_uow/1").json()["state"], "applying")
        h.clock.advance(90)
        self.assertEqual(h.admin("GET", "/_uow/1").json()["state"], "queued")


class OrderingTests(PipelineTestCase):
    """
    UOWs on one key are settled one at a time, in UOW order (invariant 4).
    """

    def test_sameKeyWaitsForRollback(self) -> None:
        """
        A second UOW on a key starts only once the first one's rollback is
        done; a UOW on another key does not wait.
        """
        journal: list[tuple[str, str, int]] = []
        a = MemoryStash("a", hang=True, journal=journal)
        h = self.build(a, timeout=5.0)
        first = h.send("PUT", "/items/1", b"one")
        a.hang = False
        second = h.send("PUT", "/items/1", b"two")
        other = h.send("PUT", "/items/2", b"other")
        self.assertEqual(h.result(other).code, 200)
        self.assertNoResult(second)
        self.assertNotIn(("a", "stash", 2), journal)
        h.clock.advance(5)
        self.assertEqual(h.result(first).code, 504)
        self.assertEqual(h.result(second).code, 200)
        self.assertLess(journal.index(("a", "rollback", 1)), journal.index(("a", "stash", 2)))
        self.assertEqual(a.bodies(), {"/items/1": b"two", "/items/2": b"other"})

    def test_frontQueueReleasesInIdOrder(self) -> None:
        """
        When spool writes finish out of order, UOWs still reach the fanout in
        id order.
        """
        from twisted.internet.defer import Deferred

        from apicontainer.pipeline._frontqueue import FrontQueue
        from apicontainer.uow import UnitOfWork

        class SlowSpool:
            def __init__(self) -> None:
                self.writes: dict[int, Deferred[UnitOfWork]] = {}

            def write(self, uow: UnitOfWork) -> Deferred[UnitOfWork]:
                self.writes[uow.id] = Deferred()
                return self.writes[uow.id].addCallback(lambda _: uow)

        from apicontainer.blocking import inline
        from apicontainer.storage._uowids import UOWIds

        ids = UOWIds(Path(self.mktemp()), inline)
        Path(self.mktemp()).mkdir()
        ids._path.parent.mkdir(parents=True, exist_ok=True)
        ids.open()
        spool = SlowSpool()
        front = FrontQueue(ids, spool)  # type: ignore[arg-type]
        template = UnitOfWork(id=0, method="PUT", key="/k", route="/k", body=b"")
        admissions = [Deferred.fromCoroutine(front.admit(template)) for _ in range(3)]
        spool.writes[3].callback(None)
        spool.writes[2].callback(None)
        self.assertEqual(front.queue.pending, [])
        spool.writes[1].callback(None)
        self.assertEqual([a.uow.id for a in front.queue.pending], [1, 2, 3])
        self.assertEqual([self.successResultOf(a).uow.id for a in admissions], [1, 2, 3])

    def test_failedSpoolWriteDoesNotHoldOthers(self) -> None:
        """
        An id whose spool write failed is skipped, not waited for.
        """
        from twisted.internet.defer import Deferred

        from apicontainer.blocking import inline
        from apicontainer.pipeline._frontqueue import FrontQueue
        from apicontainer.storage._spool import SpoolError
        from apicontainer.storage._uowids import UOWIds
        from apicontainer.uow import UnitOfWork

        class FlakySpool:
            def write(self, uow: UnitOfWork) -> Deferred[UnitOfWork]:
                if uow.id == 1:
                    raise SpoolError("disk on fire")
                return Deferred.fromCoroutine(self._ok(uow))

            async def _ok(self, uow: UnitOfWork) -> UnitOfWork:
                return uow

        path = Path(self.mktemp())
        path.parent.mkdir(parents=True, exist_ok=True)
        ids = UOWIds(path, inline)
        ids.open()
        front = FrontQueue(ids, FlakySpool())  # type: ignore[arg-type]
        template = UnitOfWork(id=0, method="PUT", key="/k", route="/k", body=b"")
        failed = Deferred.fromCoroutine(front.admit(template))
        self.failureResultOf(failed, SpoolError)
        self.successResultOf(Deferred.fromCoroutine(front.admit(template)))
        self.assertEqual([a.uow.id for a in front.queue.pending], [2])


class ClientGoneTests(PipelineTestCase):
    """
    A client that goes away while its request is being spooled does not
    stop the UOW: it is spooled, queued and stored all the same.
    """

    def deliverAfterDisconnect(self, body: bytes) -> MemoryStash:
        """
        Send C{body}, hold the spool's write, disconnect the client (Klein
        then cancels the handler and Twisted closes the request's content),
        then let the write run.
        """
        from treq.testing import StubTreq
        from twisted.internet.defer import Deferred
        from twisted.internet.error import ConnectionDone
        from twisted.python.failure import Failure
        from twisted.web.resource import Resource

        stash = MemoryStash("a")
        h = self.build(stash)
        seen = []

        class Recording(Resource):
            isLeaf = True

            def render(self, request):  # type: ignore[no-untyped-def]
                seen.append(request)
                return h.ingress.resource().render(request)

        held: list[tuple[object, tuple[object, ...], Deferred[object]]] = []

        def hold(f, *args):  # type: ignore[no-untyped-def]
            held.append((f, args, Deferred()))
            return held[-1][2]

        h.container.spool._group._blocking = hold
        client = StubTreq(Recording())
        client.put("http://apicontainer.test/items/1", data=body)
        client.flush()
        [request] = seen
        [(write, args, done)] = held
        request.connectionLost(Failure(ConnectionDone()))
        done.callback(write(*args))  # type: ignore[operator]
        client.flush()
        self.assertEqual(self.spooled(), [])
        return stash

    def test_smallBody(self) -> None:
        """
        A small body, held in memory.
        """
        stash = self.deliverAfterDisconnect(b"small")
        self.assertEqual(stash.documents["/items/1"].body, b"small")

    def test_largeBody(self) -> None:
        """
        A body streamed from the file Twisted received it into: that file is
        the UOW's, not Twisted's, which closes the request's content when
        the client goes.
        """
        from apicontainer.uow import INLINE_BODY_BYTES

        body = os.urandom(2 * INLINE_BODY_BYTES + 1)
        stash = self.deliverAfterDisconnect(body)
        self.assertEqual(stash.documents["/items/1"].body, body)


class IngressRefusalTests(PipelineTestCase):
    """
    Requests refused before spooling get the JSON error docs/http.md names and
    leave nothing on disk.
    """

    def test_badKeys(self) -> None:
        """
        Dot segments, encoded slashes, NUL, bad UTF-8 and overlong paths are 400.
        """
        a = MemoryStash("a")
        h = self.build(a)
        for path in ("/items/..", "/items/%2e%2e", "/items/a%2Fb", "/items/a%00b", "/items/%ff", "/items/" + "x" * 2000, "/items//x"):
            self.assertRefused(h.request("PUT", path, b"x"), 400, "bad_key")
        self.assertEqual(a.calls, [])

    def test_noRoute(self) -> None:
        """
        A path no route matches is 404.
        """
        self.assertRefused(self.build(MemoryStash("a")).request("PUT", "/other/1", b"x"), 404, "no_route")

    def test_methodNotAllowed(self) -> None:
        """
        A method other than the mutations and reads is 405 with Allow; so is
        a read on a route without read components.
        """
        h = self.build(MemoryStash("a"), routes=[("/items/<id>", None, None), ("/blind/<id>", None, [])])
        response = h.request("OPTIONS", "/items/1")
        self.assertRefused(response, 405, "method")
        self.assertEqual(response.header("allow"), "DELETE, GET, HEAD, PATCH, POST, PUT")
        response = h.request("GET", "/blind/1")
        self.assertRefused(response, 405, "method")
        self.assertEqual(response.header("allow"), "DELETE, PATCH, POST, PUT")

    def test_tooLarge(self) -> None:
        """
        A body over max_body_bytes is 413.
        """
        h = self.build(MemoryStash("a"), limits=Limits(maxBodyBytes=10))
        self.assertRefused(h.request("PUT", "/items/1", b"x" * 11), 413, "too_large")
        self.assertEqual(h.request("PUT", "/items/1", b"x" * 10).code, 200)

    def test_maxInFlight(self) -> None:
        """
        Past max_in_flight, 503 with Retry-After and nothing spooled.
        """
        h = self.build(MemoryStash("a", hang=True), limits=Limits(maxInFlight=1))
        h.send("PUT", "/items/1", b"x")
        response = h.request("PUT", "/items/2", b"y")
        self.assertEqual((response.code, response.json()["error"]), (503, "busy"))
        self.assertEqual(response.header("retry-after"), "1")
        self.assertEqual(self.spooled(), ["00000000000000000001.uow"])

    def test_diskFull(self) -> None:
        """
        ENOSPC while spooling is 503 with Retry-After; no spool file and no
        temporary file is left, and no stash is called.
        """
        a = MemoryStash("a")
        h = self.build(a)
        with mock.patch("apicontainer.storage._durable.os.writev", side_effect=OSError(errno.ENOSPC, "No space left on device")):
            response = h.request("PUT", "/items/1", b"x")
        self.assertRefused(response, 503, "disk_full")
        self.assertEqual(response.header("retry-after"), "5")
        self.assertEqual(a.calls, [])
        self.assertEqual(h.request("PUT", "/items/1", b"x").code, 200)

    def test_fsyncErrorIsNever2xx(self) -> None:
        """
        EIO from the sync while spooling is a 500, and nothing is spooled.
        """
        a = MemoryStash("a")
        h = self.build(a)
        with mock.patch("apicontainer.storage._spool.syncFilesystem", side_effect=OSError(errno.EIO, "Input/output error")):
            response = h.request("PUT", "/items/1", b"x")
        self.assertRefused(response, 500, "spool_failed")
        self.assertEqual(a.calls, [])

    def test_authentication(self) -> None:
        """
        With tokens configured, a missing or wrong token is 401 with
        WWW-Authenticate before anything is spooled; the right one passes.
        """
        token = b"s3cret"
        tokens = BearerTokens([hashlib.sha256(token).digest()])
        h = self.build(MemoryStash("a"), tokens=tokens)
        for headers in ({}, {"authorization": "Bearer wrong"}, {"authorization": "Basic czNjcmV0"}):
            response = h.request("PUT", "/items/1", b"x", headers)
            self.assertRefused(response, 401, "unauthorized")
            self.assertTrue(response.header("www-authenticate").startswith("Bearer"))
        self.assertEqual(h.request("PUT", "/items/1", b"x", {"authorization": "Bearer s3cret"}).code, 200)
        self.assertEqual(h.admin("GET", "/_health").code, 401)


class ReadTests(PipelineTestCase):
    """
    GET and HEAD answer from the first read component that has the key.
    """

    def test_readFirstHit(self) -> None:
        """
        The first reader that has the document answers, with its content type.
        """
        a, b = MemoryStash("a", decline=True), MemoryStash("b")
        h = self.build(a, b)
        h.request("PUT", "/items/1", b"doc", {"content-type": "text/plain"})
        response = h.request("GET", "/items/1")
        self.assertEqual((response.code, response.body), (200, b"doc"))
        self.assertEqual(response.header("content-type"), "text/plain")
        self.assertEqual(h.request("HEAD", "/items/1").code, 200)

    def test_readMissingAndDeleted(self) -> None:
        """
        An absent or deleted key is 404.
        """
        h = self.build(MemoryStash("a"))
        self.assertEqual(h.request("GET", "/items/1").json()["error"], "not_found")
        h.request("PUT", "/items/1", b"doc")
        self.assertEqual(h.request("DELETE", "/items/1").code, 200)
        self.assertEqual(h.request("GET", "/items/1").code, 404)


class AdminTests(PipelineTestCase):
    """
    The admin API shows and drops what the pipeline did.
    """

    def test_health(self) -> None:
        """
        Health answers with the fail queue's counts.
        """
        h = self.build(MemoryStash("a", failWith=503))
        h.request("PUT", "/items/1", b"x")
        body = h.admin("GET", "/_health").json()
        self.assertEqual(body["status"], "ok")
        self.assertEqual(body["failed"]["queued"], 1)

    def test_uowAndFailed(self) -> None:
        """
        /_uow/<id> shows a stored UOW's report and a failed one's entry;
        /_failed lists and filters; unknown ids and states are refused.
        """
        a = MemoryStash("a")
        h = self.build(a)
        h.request("PUT", "/items/1", b"x")
        a.failWith = 503
        h.request("PUT", "/items/2", b"y")
        stored = h.admin("GET", "/_uow/1").json()
        self.assertEqual((stored["state"], stored["report"]["outcome"]), ("stored", "stored"))
        failed = h.admin("GET", "/_uow/2").json()
        self.assertEqual((failed["state"], failed["failed"]), ("queued", True))
        self.assertEqual([e["uow"] for e in h.admin("GET", "/_failed").json()["failed"]], [2])
        self.assertEqual(h.admin("GET", "/_failed?state=parked").json()["failed"], [])
        self.assertEqual(h.admin("GET", "/_failed?state=bogus").code, 400)
        self.assertEqual(h.admin("GET", "/_uow/99").code, 404)
        self.assertEqual(h.admin("GET", "/_nothing").json()["error"], "no_route")
        self.assertEqual(h.admin("POST", "/_health").code, 405)

    def test_drop(self) -> None:
        """
        DELETE /_failed/<id> removes the entry and its spool file, durably.
        """
        h = self.build(MemoryStash("a", failWith=503))
        h.request("PUT", "/items/1", b"x")
        self.assertEqual(self.spooled(), ["00000000000000000001.uow"])
        response = h.admin("DELETE", "/_failed/1")
        self.assertEqual((response.code, response.json()["state"]), (200, "dropped"))
        self.assertEqual(self.spooled(), [])
        self.assertEqual(os.listdir(self.dataDir / "failed"), [])
        self.assertEqual(h.admin("GET", "/_uow/1").json()["state"], "dropped")
        self.assertEqual(h.admin("DELETE", "/_failed/1").code, 404)


class DurabilityTests(PipelineTestCase):
    """
    What the pipeline leaves on disk outlives the process.
    """

    def test_idsUniqueAcrossRestarts(self) -> None:
        """
        A container opened again on the same data directory never reuses an
        id, and its fail queue comes back.
        """
        a = MemoryStash("a", failWith=503)
        h = self.build(a)
        first = h.request("PUT", "/items/1", b"x").json()["uow"]
        again = ContainerHarness(self.dataDir, [MemoryStash("a")])
        second = again.request("PUT", "/items/1", b"x").json()["uow"]
        self.assertGreater(second, first)
        self.assertEqual([e.uow for e in again.container.failQueue.list()], [first])


class UnsettledTests(PipelineTestCase):
    """
    A UOW whose outcome could not be made durable is never forgotten by the
    running server: it is re-driven until it settles, and said to be
    unsettled meanwhile.
    """

    def diskFull(self, h: ContainerHarness) -> mock._patch:  # type: ignore[type-arg]
        """
        The fail queue cannot be written, as on a full disk.
        """
        return mock.patch.object(
            h.container.failQueue,
            "put",
            side_effect=OSError(errno.ENOSPC, "No space left on device"),
        )

    def test_failQueueWriteFailsOnFullDisk(self) -> None:
        """
        The write that meets ENOSPC: one stash stored and cannot roll back,
        the other failed, and the fail queue cannot record it. The client
        gets the 5xx; the UOW is unsettled (/_uow, /_health, /metrics say
        so); an Idempotency-Key resend is 409 meanwhile. Once space returns
        the server re-drives it with no restart: it ends stored in both
        stores, and the resend gets that final answer.
        """
        records = MemoryStash("records", failRollback=True)
        files = MemoryStash("files", failWith=503)
        h = self.build(records, files)
        headers = {"idempotency-key": "k-1"}
        with self.diskFull(h):
            response = h.request("PUT", "/items/1", b"x", headers)
            self.assertEqual((response.code, response.json()["outcome"]), (503, "queued"))
            self.assertEqual(records.bodies(), {"/items/1": b"x"})
            self.assertEqual(files.bodies(), {})
            self.assertEqual(h.admin("GET", "/_uow/1").json()["state"], "unsettled")
            self.assertEqual(h.admin("GET", "/_failed").json()["failed"], [])
            health = h.admin("GET", "/_health").json()
            self.assertEqual((health["status"], health["unsettled"]), ("attention", 1))
            self.assertIn("1 UOW(s) unsettled", health["alarms"][0])
            self.assertIn(b"apicontainer_unsettled 1.0", h.admin("GET", "/metrics").body)
            self.assertEqual(h.request("PUT", "/items/1", b"x", headers).code, 409)
            # Still full at the first re-drive: kept, with a longer backoff.
            h.clock.advance(1.0)
            self.assertEqual(h.admin("GET", "/_uow/1").json()["unsettled_tries"], 2)
        self.assertEqual(self.spooled(), ["00000000000000000001.uow"])
        records.failRollback, files.failWith = False, None
        h.clock.advance(2.0)
        self.assertEqual(h.admin("GET", "/_uow/1").json()["state"], "stored")
        self.assertEqual((records.bodies(), files.bodies()), ({"/items/1": b"x"}, {"/items/1": b"x"}))
        self.assertEqual((self.spooled(), h.container.failQueue.list()), ([], []))
        self.assertEqual(h.admin("GET", "/_health").json()["status"], "ok")
        replay = h.request("PUT", "/items/1", b"x", headers)
        self.assertEqual((replay.code, replay.json()["uow"], replay.json()["outcome"]), (200, 1, "stored"))
        self.flushLoggedErrors(OSError)

    def test_stateStoreFullAfterCommit(self) -> None:
        """
        The write is in every store but its final state cannot be recorded:
        the client gets 500 pending, /_uow says unsettled (not received with
        no report), and the re-drive records it as stored once it can.
        """
        a = MemoryStash("a")
        h = self.build(a)
        full = OSError(errno.ENOSPC, "database or disk is full")
        with mock.patch.object(h.container.journal, "settle", side_effect=full):
            response = h.request("PUT", "/items/1", b"x")
            self.assertEqual((response.code, response.json()["outcome"]), (500, "pending"))
            self.assertEqual(h.admin("GET", "/_uow/1").json()["state"], "unsettled")
            self.assertIn("database or disk is full", h.admin("GET", "/_uow/1").json()["reason"])
        h.clock.advance(1.0)
        self.assertEqual(h.admin("GET", "/_uow/1").json()["state"], "stored")
        self.assertEqual((a.bodies(), a.undo, self.spooled()), ({"/items/1": b"x"}, {}, []))
        self.flushLoggedErrors(OSError)

    def test_unsettledKeepsKeyOrder(self) -> None:
        """
        A later UOW on the key of an unsettled one is applied; the re-drive
        of the older one then never overwrites it (superseded).
        """
        a = MemoryStash("a")
        h = self.build(a)
        with mock.patch.object(h.container.journal, "settle", side_effect=OSError(errno.ENOSPC, "full")):
            self.assertEqual(h.request("PUT", "/items/1", b"old").code, 500)
        self.assertEqual(h.request("PUT", "/items/1", b"new").code, 200)
        h.clock.advance(1.0)
        self.assertEqual(a.bodies(), {"/items/1": b"new"})
        self.assertEqual(h.admin("GET", "/_uow/1").json()["state"], "superseded")
        self.assertEqual(h.container.fanout.unsettled, {})
        self.flushLoggedErrors(OSError)


class DiskCostTests(PipelineTestCase):
    """
    limits.min_free_bytes counts what a write really costs on each disk: the
    spool file and the local stashes' files, not only the body.
    """

    def free(self, bytes_: int) -> mock._patch:  # type: ignore[type-arg]
        stats = os.statvfs_result((4096, 1, 0, 0, bytes_, 0, 0, 0, 0, 255))
        return mock.patch("apicontainer.pipeline._container.os.statvfs", return_value=stats)

    def test_localStashesCount(self) -> None:
        """
        With a SQLite stash on the spool's disk, a 100 KiB write needs room
        for the spool file, about three copies in SQLite and a checkpoint's
        worth of pages (4000 KiB): 4 MiB free is not enough (503 disk_full,
        nothing spooled, no stash called), 5 MiB is.
        """
        from apicontainer.blocking import inline
        from apicontainer.stashes._sqlite import SQLiteStash

        dataDir = Path(self.mktemp())
        records = SQLiteStash("records", dataDir / "records.sqlite3", inline)
        h = ContainerHarness(dataDir, [records], limits=Limits(minFreeBytes=0))
        self.dataDir = dataDir
        body = b"x" * 100 * 1024
        with self.free(4 * 1024 * 1024):
            response = h.request("PUT", "/items/1", body)
        self.assertRefused(response, 503, "disk_full")
        self.assertEqual(self.spooled(), [])
        self.assertIsNone(self.successResultOf(records.read("/items/1")))
        with self.free(5 * 1024 * 1024):
            self.assertEqual(h.request("PUT", "/items/1", body).code, 200)

    def test_reserveIsKept(self) -> None:
        """
        The reserve comes on top of the write's cost.
        """
        h = self.build(MemoryStash("a"), limits=Limits(minFreeBytes=1024 * 1024))
        with self.free(1024 * 1024 + 64 * 1024):
            self.assertRefused(h.request("PUT", "/items/1", b"x"), 503, "disk_full")
        with self.free(1024 * 1024 + 128 * 1024):
            self.assertEqual(h.request("PUT", "/items/1", b"x").code, 200)


    def test_resendWithItsKeyOnAFullDisk(self) -> None:
        """
        On a full disk, a resend under an Idempotency-Key gets the answer
        its key has, as it writes nothing: the first request's result once
        it is stored, 409 while it is under way. A new key gets disk_full,
        and can be sent again once there is room.
        """
        a, b = MemoryStash("a"), MemoryStash("b")
        h = self.build(a, b, limits=Limits(minFreeBytes=1024 * 1024))
        stored = {"idempotency-key": "first"}
        self.assertEqual(h.request("PUT", "/items/1", b"x", stored).code, 200)
        b.hang = True
        waiting = h.send("PUT", "/items/2", b"y", {"idempotency-key": "second"})
        with self.free(0):
            replay = h.request("PUT", "/items/1", b"x", stored)
            self.assertEqual((replay.code, replay.header("idempotent-replayed")), (200, "true"))
            underWay = h.request("PUT", "/items/2", b"y", {"idempotency-key": "second"})
            self.assertEqual((underWay.code, underWay.json()["error"]), (409, "idempotency_key"))
            full = h.request("PUT", "/items/3", b"z", {"idempotency-key": "third"})
            self.assertEqual((full.code, full.json()["error"]), (503, "disk_full"))
            self.assertEqual(self.spooled(), ["00000000000000000002.uow"])
        b.hang = False
        for hanging in b.hanging:
            hanging.callback(Verdict.stored())
        self.assertEqual(h.result(waiting).code, 200)
        self.assertEqual(h.request("PUT", "/items/3", b"z", {"idempotency-key": "third"}).code, 200)


class HousekeepingTests(PipelineTestCase):
    """
    Rollback markers are forgotten once the retention is over, and never
    those of a UOW that can still see a stash call.
    """

    def test_markersOfOldUOWsArePruned(self) -> None:
        """
        After idempotency.retention_s (and the next housekeeping), the
        marker of a rejected UOW is forgotten; the marker of a UOW still in
        the fail queue, however old, is kept.
        """
        a, b = MemoryStash("a"), MemoryStash("b", failWith=422)
        h = self.build(a, b, retry=RetryPolicy(maxAttempts=1))
        self.assertEqual(h.request("PUT", "/items/1", b"x").code, 422)
        b.failWith = 503
        self.assertEqual(h.request("PUT", "/items/2", b"x").code, 503)
        self.assertEqual(sorted(a.undo), [1, 2])
        h.clock.advance(3600)
        self.assertEqual(sorted(a.undo), [1, 2])
        h.clock.advance(86400)
        self.assertEqual(sorted(a.undo), [2])
        [entry] = h.container.failQueue.list()
        self.assertEqual((entry.uow, entry.state.value), (2, "parked"))

    def test_horizonWaitsForTheRetention(self) -> None:
        """
        Before the server has run for the retention there is no horizon;
        after it, the horizon is the next id of that time, and never above
        a UOW under way.
        """
        h = self.build(MemoryStash("a"), MemoryStash("b", hang=True))
        self.assertIsNone(h.container.housekeeping.markerHorizon())
        h.send("PUT", "/items/1", b"x")
        h.clock.advance(86400)
        self.assertEqual(h.container.housekeeping.markerHorizon(), 1)
