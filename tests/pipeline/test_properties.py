"""
Property tests: a Hypothesis state machine drives the pipeline on a fake
clock through random writes, stash failures, timeouts, late completions,
crashes and recoveries, and checks the invariants of docs/design.md
after every step; the spool parser and the config loader are fuzzed.
"""

from __future__ import annotations

import shutil
import sqlite3
import tempfile
from pathlib import Path

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule
from twisted.trial.unittest import SynchronousTestCase

from apicontainer.config import ConfigError, loadConfig
from apicontainer.storage._failqueue import RetryPolicy
from apicontainer.storage._spoolfile import CorruptSpoolFile, decode, encode
from apicontainer.testing import ContainerHarness, MemoryStash
from apicontainer.uow import UnitOfWork

KEYS = ["/items/1", "/items/2"]


class PipelineMachine(RuleBasedStateMachine):
    """
    Two in-memory stashes (the external stores, which outlive crashes) and
    a container on a fake clock that can be crashed and rebuilt.
    """

    def __init__(self) -> None:
        super().__init__()
        self.directory = Path(tempfile.mkdtemp(prefix="apicontainer-machine-"))
        self.stashes = {"a": MemoryStash("a"), "b": MemoryStash("b")}
        self.acked: list[tuple[int, str]] = []
        self.seen: set[int] = set()
        self.waiting: list[object] = []
        self.harness = self._build()

    def _build(self) -> ContainerHarness:
        return ContainerHarness(
            self.directory,
            list(self.stashes.values()),
            retry=RetryPolicy(initial=1, factor=2, maxDelay=4, maxAttempts=1000),
            timeout=5.0,
        )

    def teardown(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)

    @rule(which=st.sampled_from(["a", "b"]), mode=st.sampled_from(["ok", "503", "422", "halfway", "hang"]))
    def setMode(self, which: str, mode: str) -> None:
        """
        Make one stash work, fail (before or after writing), or hang.
        """
        stash = self.stashes[which]
        stash.failWith = {"503": 503, "422": 422, "halfway": 500}.get(mode)
        stash.failAfterWrite = mode == "halfway"
        stash.hang = mode == "hang"

    @rule(key=st.sampled_from(KEYS), body=st.binary(max_size=3))
    def write(self, key: str, body: bytes) -> None:
        """
        Send a PUT; note what the client was told.
        """
        self.waiting.append((key, self.harness.send("PUT", key, body)))
        self._collect()

    @rule(seconds=st.sampled_from([0.5, 1.0, 2.0, 5.0, 30.0]))
    def advance(self, seconds: float) -> None:
        """
        Let time pass: timeouts fire, retries come.
        """
        self.harness.clock.advance(seconds)
        self._collect()

    @rule(which=st.sampled_from(["a", "b"]))
    def lateCompletion(self, which: str) -> None:
        """
        A hanging stash call completes after its timeout cancelled it.
        """
        stash = self.stashes[which]
        for waiting in stash.hanging:
            if not waiting.called:
                waiting.callback(None)
        stash.hanging.clear()

    @rule()
    def crashAndRecover(self) -> None:
        """
        The process dies: everything in memory is gone, the stores and the
        data directory stay; a new container recovers.
        """
        for stash in self.stashes.values():
            stash.hanging.clear()
        self.waiting.clear()
        self.harness = self._build()
        self._collect()

    def _collect(self) -> None:
        self.harness.flush()
        still = []
        for key, response in self.waiting:
            if not response.called:
                still.append((key, response))
                continue
            answer = self.harness.result(response)
            body = answer.json()
            if "uow" in body:
                self.seen.add(body["uow"])
                if answer.code == 200:
                    self.acked.append((body["uow"], key))
        self.waiting = still

    def _quiet(self) -> bool:
        container = self.harness.container
        return not container.fanout.active and not container.failQueue.list()

    @invariant()
    def noLostAck(self) -> None:
        """
        Every acknowledged write is in both stores, or was replaced there by
        a later UOW on its key.
        """
        for uowId, key in self.acked:
            for stash in self.stashes.values():
                document = stash.documents.get(key)
                assert document is not None and document.uow >= uowId, (uowId, key, stash.name)

    @invariant()
    def allOrNothing(self) -> None:
        """
        With nothing under way or waiting, both stores hold the same UOW's
        write on every key.
        """
        if self._quiet():
            a, b = self.stashes["a"].documents, self.stashes["b"].documents
            assert {k: d.uow for k, d in a.items()} == {k: d.uow for k, d in b.items()}

    @invariant()
    def nothingVanishes(self) -> None:
        """
        Every UOW a client heard of is spooled (under way), in the fail
        queue, or has a final state.
        """
        container = self.harness.container
        spooled = set(container.spool.pending())
        db = sqlite3.connect(self.directory / "state.sqlite3")
        try:
            final = {row[0] for row in db.execute("SELECT uow FROM uows")}
        finally:
            db.close()
        for uowId in self.seen:
            assert uowId in spooled or uowId in final or container.failQueue.get(uowId), uowId

    @invariant()
    def newestWins(self) -> None:
        """
        With nothing under way or waiting, each key holds the write of the
        newest UOW stored on it.
        """
        if not self._quiet():
            return
        db = sqlite3.connect(self.directory / "state.sqlite3")
        try:
            newest = dict(db.execute("SELECT key, max(uow) FROM uows WHERE state = 'stored' GROUP BY key"))
        finally:
            db.close()
        for key in KEYS:
            document = self.stashes["a"].documents.get(key)
            assert (document.uow if document else None) == newest.get(key), key


class PipelineProperties(SynchronousTestCase):
    def test_invariants(self) -> None:
        """
        The invariants hold along random runs of the state machine.
        """
        machine = PipelineMachine.TestCase
        machine.settings = settings(
            max_examples=40, stateful_step_count=40, deadline=None, suppress_health_check=list(HealthCheck)
        )
        result = machine("runTest")
        result.runTest()
        self.flushLoggedErrors()


class ParserFuzzTests(SynchronousTestCase):
    """
    The spool parser and the config loader only ever raise their own error.
    """

    @settings(max_examples=300, deadline=None)
    @given(st.binary(max_size=200))
    def test_spoolGarbage(self, data: bytes) -> None:
        """
        Arbitrary bytes are a spool file or a CorruptSpoolFile, nothing else.
        """
        try:
            decode(data)
        except CorruptSpoolFile:
            pass

    @settings(max_examples=300, deadline=None)
    @given(st.data())
    def test_spoolMutations(self, data: st.DataObject) -> None:
        """
        A real spool file with bytes changed, cut or added is refused as
        corrupt (or, unchanged, read back exactly).
        """
        uow = UnitOfWork(id=3, method="PUT", key="/k", route="/k", body=data.draw(st.binary(max_size=50)), attempt=3)
        frame = bytearray(b"".join(encode(uow)))
        edits = data.draw(st.lists(st.tuples(st.integers(0, len(frame) - 1), st.integers(0, 255)), max_size=3))
        for index, value in edits:
            frame[index] = value
        frame = frame[: data.draw(st.integers(0, len(frame)))] + data.draw(st.binary(max_size=3))
        try:
            self.assertEqual(decode(bytes(frame)), uow)
        except CorruptSpoolFile:
            pass

    @settings(max_examples=300, deadline=None)
    @given(
        st.recursive(
            st.none() | st.booleans() | st.integers() | st.text(max_size=8) | st.sampled_from(["sqlite", "/items/<id>", "tcp:0"]),
            lambda inner: st.lists(inner, max_size=3)
            | st.dictionaries(
                st.sampled_from(["listen", "stashes", "routes", "type", "path", "limits", "read", "a", "failqueue", "retry"]),
                inner,
                max_size=4,
            ),
            max_leaves=12,
        )
    )
    def test_configGarbage(self, document: object) -> None:
        """
        Any YAML document is a config or a ConfigError with one line.
        """
        path = Path(self.mktemp())
        path.write_text(yaml.safe_dump(document))
        try:
            loadConfig(path)
        except ConfigError as e:
            self.assertNotIn("\n", str(e))

    @settings(max_examples=200, deadline=None)
    @given(st.text(max_size=80))
    def test_configText(self, text: str) -> None:
        """
        Any text is a config or a ConfigError with one line.
        """
        path = Path(self.mktemp())
        path.write_bytes(text.encode("utf-8", "surrogatepass"))
        try:
            loadConfig(path)
        except ConfigError as e:
            self.assertNotIn("\n", str(e))
