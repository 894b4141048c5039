"""
apicontainer.client settles a mutation exactly once through lost
connections, lost answers, busy servers and in-flight repeats.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred, fail
from twisted.trial.unittest import SynchronousTestCase
from twisted.web._newclient import ResponseNeverReceived

from apicontainer.client import ContainerClient, DeliveryUncertain
from apicontainer.config import Limits
from apicontainer.testing import ContainerHarness, MemoryStash


class FlakyNetwork:
    """
    Sits between the client and the harness's ingress; can refuse
    connections, or deliver a request and lose its answer.
    """

    def __init__(self, harness: ContainerHarness) -> None:
        self.harness = harness
        self.plan: list[str] = []
        self.sent: list[dict[str, Any]] = []

    def request(self, method: str, url: str, data: bytes | None = None, headers: Any = None) -> Deferred[Any]:
        self.sent.append(dict(headers))
        step = self.plan.pop(0) if self.plan else "deliver"
        if step == "refuse":
            from twisted.internet.error import ConnectionRefusedError

            return fail(ConnectionRefusedError())
        answer = self.harness._client.request(method, url, data=data, headers=headers)
        self.harness.flush()
        if step == "lose-answer":
            return answer.addCallback(lambda _: fail(ResponseNeverReceived([])))
        return answer


class ClientTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.stash = MemoryStash("a")
        self.harness = ContainerHarness(
            Path(self.mktemp()), [self.stash], limits=Limits(maxInFlight=1), timeout=5.0
        )
        self.network = FlakyNetwork(self.harness)
        self.client = ContainerClient(
            "http://apicontainer.test", self.harness.clock, http=self.network, uniform=lambda: 1.0
        )

    def send(self) -> Deferred[Any]:
        return Deferred.fromCoroutine(self.client.send("PUT", "/items/1", b"x"))

    def test_refusedThenDelivered(self) -> None:
        """
        Refused connections are retried after backoff with the same key.
        """
        self.network.plan = ["refuse", "refuse"]
        sending = self.send()
        self.assertNoResult(sending)
        self.harness.clock.advance(0.5)
        self.assertNoResult(sending)
        self.harness.clock.advance(1.0)
        answer = self.successResultOf(sending)
        self.assertEqual((answer.status, answer.attempts), (200, 3))
        keys = {h["Idempotency-Key"] for h in self.network.sent}
        self.assertEqual(len(keys), 1)

    def test_lostAnswerAppliedOnce(self) -> None:
        """
        When the server applied the write but the answer was lost, the
        retry gets the same UOW's result and the stash stored it once.
        """
        self.network.plan = ["lose-answer"]
        sending = self.send()
        self.harness.clock.advance(0.5)
        answer = self.successResultOf(sending)
        self.assertEqual((answer.status, answer.body["uow"], answer.attempts), (200, 1, 2))
        self.assertEqual(answer.headers["idempotent-replayed"], "true")
        self.assertEqual([m for m, _ in self.stash.calls], ["stash", "commit"])

    def test_busyHonoursRetryAfter(self) -> None:
        """
        A 503 busy (max_in_flight reached) is retried after its Retry-After
        until the request ahead of it times out and frees its place.
        """
        self.stash.hang = True
        self.harness.send("PUT", "/items/2", b"y")
        self.stash.hang = False
        sending = self.send()
        self.assertNoResult(sending)
        self.harness.clock.pump([1] * 4)
        self.assertNoResult(sending)
        self.harness.clock.pump([1] * 4)
        answer = self.successResultOf(sending)
        self.assertEqual(answer.status, 200)
        self.assertGreater(answer.attempts, 3)

    def test_rejectionIsSettled(self) -> None:
        """
        A 4xx with a UOW is a settled answer: no retry.
        """
        self.stash.failWith = 422
        answer = self.successResultOf(self.send())
        self.assertEqual((answer.status, answer.body["outcome"], answer.attempts), (422, "rejected", 1))

    def test_givesUp(self) -> None:
        """
        After its attempts, the client says delivery is uncertain, with the
        key to resume with.
        """
        self.network.plan = ["refuse"] * 8
        sending = self.send()
        self.harness.clock.pump([30] * 8)
        failure = self.failureResultOf(sending, DeliveryUncertain)
        self.assertEqual(failure.value.attempts, 8)
        self.assertEqual(failure.value.idempotencyKey, self.network.sent[0]["Idempotency-Key"])

    def test_pendingIsSentAgain(self) -> None:
        """
        A pending answer, 504 from one server or 202 from an instance on the
        shared spool, is not settled: the same key is sent again at once;
        a queued 5xx with its UOW is settled.
        """
        from apicontainer.client import Answer

        pending = {"uow": 7, "outcome": "pending", "message": "still under way"}
        for status in (202, 504):
            self.assertEqual(ContainerClient._retryAfter(Answer(status, {}, pending, "k", 1)), 0.0)
        queued = {"uow": 7, "outcome": "queued", "stashes": {}}
        self.assertIsNone(ContainerClient._retryAfter(Answer(503, {}, queued, "k", 1)))
