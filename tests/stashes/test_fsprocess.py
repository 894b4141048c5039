"""
The filesystem stash in a child process: the stash contract and random
interleavings through a real child, the frames, large bodies read from the
spool, and what happens when the child ends.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from attrs import evolve
from twisted.internet import reactor
from twisted.internet.defer import CancelledError, gatherResults
from twisted.internet.task import deferLater

from apicontainer.config import ConfigError, StashSpec
from apicontainer.stashes._filesystem import FilesystemStash
from apicontainer.stashes._fsprocess import FilesystemProcessStash
from apicontainer.storage._childprotocol import decodeUOW, encodeUOW, frame, frames
from apicontainer.testing import BATCH_CONTRACT, CONTRACT, checkInterleaving, contractUOW, randomInterleavings
from apicontainer.uow import SpooledBody, VerdictKind

pytestmark = pytest.mark.process


async def started(root: Path) -> FilesystemProcessStash:
    stash = FilesystemProcessStash("files", root, reactor)
    await stash.start()
    return stash


def childPid(stash: FilesystemProcessStash) -> int:
    assert stash._runner is not None and stash._runner.pid is not None
    return stash._runner.pid


async def ended(stash: FilesystemProcessStash) -> None:
    assert stash._runner is not None
    while stash._runner._child is not None:
        await deferLater(reactor, 0.01)


@pytest.mark.parametrize("check", list(CONTRACT.values()), ids=list(CONTRACT))
@pytest_twisted.ensureDeferred
async def test_contract(tmp_path: Path, check: Any) -> None:
    """
    Through its child, the filesystem stash keeps each rule of the stash
    contract.
    """
    stash = await started(tmp_path / "files")
    try:
        await check(stash)
    finally:
        await stash.stop()


@pytest.mark.parametrize("check", list(BATCH_CONTRACT.values()), ids=list(BATCH_CONTRACT))
@pytest_twisted.ensureDeferred
async def test_batchContract(tmp_path: Path, check: Any) -> None:
    """
    Through its child, in one call for a batch of UOWs, the filesystem
    stash treats each UOW as if it came alone.
    """
    stash = await started(tmp_path / "files")
    try:
        await check(stash)
    finally:
        await stash.stop()


@pytest_twisted.ensureDeferred
async def test_interleavings(tmp_path: Path) -> None:
    """
    Random interleavings give the verdicts and documents of the reference.
    """
    for number, operations in enumerate(randomInterleavings(12, seed=4222)):
        stash = await started(tmp_path / f"files-{number}")
        try:
            await checkInterleaving(stash, operations)
        finally:
            await stash.stop()


def test_frames() -> None:
    """
    Frames come off a buffer whole, however the bytes arrive; a partial
    frame waits for the rest.
    """
    data = frame({"op": "stash", "n": 1}, b"body\x00") + frame({"op": "read"}) + frame({"n": 3}, b"x" * 70000)
    buffer = bytearray()
    seen = []
    for start in range(0, len(data), 997):
        buffer += data[start : start + 997]
        seen.extend(frames(buffer))
    assert seen == [({"op": "stash", "n": 1}, b"body\x00"), ({"op": "read"}, b""), ({"n": 3}, b"x" * 70000)]
    assert buffer == bytearray()


def test_uowRoundTrip(tmp_path: Path) -> None:
    """
    A UOW crosses whole; a spooled body crosses as where it lies, not as
    its bytes.
    """
    uow = contractUOW(7, b"seven", attempt=9)
    assert decodeUOW(*encodeUOW(uow)) == uow
    spool = tmp_path / "7.uow"
    spool.write_bytes(b"head" + b"b" * 100000 + b"tail")
    large = evolve(contractUOW(8), body=SpooledBody(spool, 4, 100000))
    head, body = encodeUOW(large)
    assert body == b"" and head["spooled"] == [str(spool), 4, 100000]
    assert decodeUOW(head, body).body == b"b" * 100000


def test_uowWithoutBody(tmp_path: Path) -> None:
    """
    A UOW sent without its body (to a commit or a rollback) crosses with
    its id, key, method and attempt, and neither its bytes nor where they
    lie.
    """
    uow = contractUOW(7, b"seven" * 1000, attempt=9)
    head, body = encodeUOW(uow, withBody=False)
    assert body == b""
    crossed = decodeUOW(head, body)
    assert crossed == evolve(uow, body=b"")
    assert (crossed.id, crossed.key, crossed.method, crossed.attempt) == (7, "/items/1", "PUT", 9)
    spool = tmp_path / "8.uow"
    spool.write_bytes(b"b" * 100)
    head, body = encodeUOW(evolve(contractUOW(8), body=SpooledBody(spool, 0, 100)), withBody=False)
    assert body == b"" and "spooled" not in head


@pytest_twisted.ensureDeferred
async def test_largeBodyReadFromTheSpool(tmp_path: Path) -> None:
    """
    The child reads a large body from the spool file and stores it whole.
    """
    spool = tmp_path / "9.uow"
    body = os.urandom(300000)
    spool.write_bytes(b"head" + body + b"tail")
    stash = await started(tmp_path / "files")
    try:
        uow = evolve(contractUOW(9), body=SpooledBody(spool, 4, len(body)))
        assert (await stash.stash(uow)).kind is VerdictKind.stored
        await stash.commit(uow)
        assert (await stash.read("/items/1")).body == body  # type: ignore[union-attr]
    finally:
        await stash.stop()


@pytest_twisted.ensureDeferred
async def test_manyCallsInFlight(tmp_path: Path) -> None:
    """
    Calls made together (one batch in the child) get their own answers.
    """
    stash = await started(tmp_path / "files")
    try:
        uows = [contractUOW(n, b"body %d" % n, key=f"/items/{n}") for n in range(1, 81)]
        verdicts = await gatherResults([stash.stash(uow) for uow in uows])
        assert [v.kind for v in verdicts] == [VerdictKind.stored] * 80
        await gatherResults([stash.commit(uow) for uow in uows])
        documents = await gatherResults([stash.read(f"/items/{n}") for n in range(1, 81)])
        assert [(d.body, d.uow) for d in documents] == [(b"body %d" % n, n) for n in range(1, 81)]
    finally:
        await stash.stop()


async def spares(root: Path, count: int) -> list[Path]:
    """
    The files of C{root/.spares} once there are C{count} of them (or after
    10 s).
    """
    folder = root / ".spares"
    for _ in range(500):
        if folder.exists() and len(os.listdir(folder)) == count:
            break
        await deferLater(reactor, 0.02)
    return list(folder.iterdir()) if folder.exists() else []


@pytest_twisted.ensureDeferred
async def test_sparesMadeWhileIdle(tmp_path: Path) -> None:
    """
    While no call waits, the child makes empty spare files, up to SPARES;
    a write takes one for its version (the same inode), and the child makes
    another.
    """
    from apicontainer.stashes._filesystem import SPARES

    root = tmp_path / "files"
    stash = await started(root)
    try:
        made = await spares(root, SPARES)
        assert (len(made), {spare.stat().st_size for spare in made}) == (SPARES, {0})
        inodes = {spare.stat().st_ino for spare in made}
        await stash.stash(contractUOW(1, b"one", key="/items/1"))
        assert (root / "items" / "1.v1").stat().st_ino in inodes
        assert (root / "items" / "1.v1").read_bytes() == b"one"
        assert len(await spares(root, SPARES)) == SPARES
    finally:
        await stash.stop()


@pytest_twisted.ensureDeferred
async def test_aKilledChildFailsItsCallsAndANewOneTakesOver(tmp_path: Path) -> None:
    """
    A call the child never answered is a 503; the next call starts a new
    child, which reads the undo records back: a rollback after the restart
    restores the before-image.
    """
    stash = await started(tmp_path / "files")
    try:
        first, second = contractUOW(1, b"first"), contractUOW(2, b"second")
        assert (await stash.stash(first)).kind is VerdictKind.stored
        await stash.commit(first)
        assert (await stash.stash(second)).kind is VerdictKind.stored
        lost = stash.stash(contractUOW(3, b"third", key="/items/3"))
        os.kill(childPid(stash), signal.SIGKILL)
        verdict = await lost
        assert (verdict.kind, verdict.status) == (VerdictKind.failed, 503)
        assert "ended" in (verdict.detail or "")
        await ended(stash)
        await stash.rollback(second)
        assert (await stash.read("/items/1")).body == b"first"  # type: ignore[union-attr]
    finally:
        await stash.stop()


@pytest_twisted.ensureDeferred
async def test_aCallGivenUpOnKeepsTheOthersInStep(tmp_path: Path) -> None:
    """
    A call given up on (its timeout cancels it) still takes its answer off
    the line, so that the next call gets its own.
    """
    stash = await started(tmp_path / "files")
    try:
        given = stash.stash(contractUOW(1, b"one"))
        given.cancel()
        with pytest.raises(CancelledError):
            await given
        verdict = await stash.stash(contractUOW(2, b"two", key="/items/2")).addTimeout(10, reactor)
        assert verdict.kind is VerdictKind.stored
        assert (await stash.read("/items/2").addTimeout(10, reactor)).body == b"two"  # type: ignore[union-attr]
    finally:
        await stash.stop()


@pytest_twisted.ensureDeferred
async def test_oneChildPerRoot(tmp_path: Path) -> None:
    """
    Two stashes of one server on one root (the old and the new one while a
    reload hands over) share one child, which ends when the last stops; the
    child of another server on the root (one restarted while the child of
    the last still finishes its batch) waits for it to end.
    """
    root = tmp_path / "files"
    first = await started(root)
    second = await started(root)
    assert first._runner is second._runner
    assert (await first.stash(contractUOW(1, b"one"))).kind is VerdictKind.stored
    await second.commit(contractUOW(1, b"one"))
    await first.stop()
    assert (await second.read("/items/1")).body == b"one"  # type: ignore[union-attr]
    other = subprocess.Popen(
        [sys.executable, "-m", "apicontainer.stashes._fsprocess", "files", str(root)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE,
    )
    try:
        await deferLater(reactor, 1.0)
        assert select.select([other.stdout], [], [], 0)[0] == []
        await second.stop()
        assert select.select([other.stdout], [], [], 10)[0] != []
        assert list(frames(bytearray(os.read(other.stdout.fileno(), 4096)))) == [({"ok": True}, b"")]  # type: ignore[union-attr]
    finally:
        other.stdin.close()  # type: ignore[union-attr]
        assert other.wait(10) == 0
    late = await first.stash(contractUOW(2, b"two"))
    assert (late.status, "not started" in (late.detail or "")) == (503, True)


@pytest_twisted.ensureDeferred
async def test_errorsComeBackAsVerdicts(tmp_path: Path) -> None:
    """
    A write the file system refuses is a 503 naming the problem; a root that
    cannot be opened fails the start.
    """
    stash = await started(tmp_path / "files")
    try:
        (tmp_path / "files" / "items").write_bytes(b"a file where a folder goes")
        verdict = await stash.stash(contractUOW(1, b"one"))
        assert (verdict.kind, verdict.status) == (VerdictKind.failed, 503)
        assert "FilesystemProcessStash: NotADirectoryError: [Errno 20] Not a directory" in (verdict.detail or "")
    finally:
        await stash.stop()
    (tmp_path / "plain").write_bytes(b"")
    broken = FilesystemProcessStash("files", tmp_path / "plain", reactor)
    with pytest.raises(OSError, match="Not a directory"):
        await broken.start()
    await ended(broken)
    await broken.stop()


def test_processOption(tmp_path: Path) -> None:
    """
    C{process} picks the child; by default it is used where the reactor can
    start processes, and a value that is not a boolean is refused.
    """
    from apicontainer.blocking import inline
    from apicontainer.config import loadConfig
    from apicontainer.stashes import StashContext

    def build(options: str, withReactor: bool) -> Any:
        path = tmp_path / "config.yaml"
        path.write_text(
            f"data_dir: {tmp_path}\nstashes:\n  files: {{type: filesystem, root: files{options}}}\n"
            "routes:\n  - path: /items/<id>\n    stashes: [files]\n"
        )
        spec: StashSpec = loadConfig(path).stashes["files"]
        context = StashContext(reactor if withReactor else None, tmp_path, inline, lambda name: inline, reactor if withReactor else None)
        return FilesystemStash.fromConfig(spec, context)

    assert isinstance(build("", True), FilesystemProcessStash)
    assert isinstance(build("", False), FilesystemStash)
    assert isinstance(build(", process: false", True), FilesystemStash)
    with pytest.raises(ConfigError, match="process: must be true or false"):
        build(", process: 'yes'", True)
