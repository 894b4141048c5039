"""
The file backends of the spool and of the fail queue keep the backend
contract (apicontainer.testing.SPOOL_CONTRACT and FAILQUEUE_CONTRACT), which
any other backend must keep too: with the journal in the server's threads
and in its child process; and the jetstream backends, on a 3-node cluster.
"""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.task import Clock

from apicontainer.blocking import inline
from apicontainer.storage import RetryPolicy, fileFailQueue, fileSpool, jetstreamFailQueue, jetstreamSpool
from apicontainer.testing import FAILQUEUE_CONTRACT, SPOOL_CONTRACT


@pytest.mark.parametrize("check", list(SPOOL_CONTRACT.values()), ids=list(SPOOL_CONTRACT))
@pytest_twisted.ensureDeferred
async def test_fileSpool(tmp_path: Path, check: Any) -> None:
    """
    The file spool, with the journal writing through the server's runners.
    """
    await check(lambda: fileSpool(tmp_path, inline, None, None))


@pytest.mark.process
@pytest.mark.parametrize("check", list(SPOOL_CONTRACT.values()), ids=list(SPOOL_CONTRACT))
@pytest_twisted.ensureDeferred
async def test_fileSpoolWithTheJournalsChild(tmp_path: Path, check: Any) -> None:
    """
    The file spool, with the journal in its child process, as in the server.
    """
    await check(lambda: fileSpool(tmp_path, inline, None, reactor))


@pytest.mark.parametrize("check", list(FAILQUEUE_CONTRACT.values()), ids=list(FAILQUEUE_CONTRACT))
@pytest_twisted.ensureDeferred
async def test_fileFailQueue(tmp_path: Path, check: Any) -> None:
    clock = Clock()
    clock.advance(1000)
    await check(lambda: fileFailQueue(tmp_path, inline, clock, RetryPolicy(maxAttempts=3), lambda: 0.5), clock)


def _settings(cluster: Any, **overrides: Any) -> Any:
    from apicontainer.storage import JetStreamSettings

    return JetStreamSettings(
        servers=tuple(cluster.urls), stream=f"T{uuid.uuid4().hex[:10]}", partitions=4, **overrides
    )


@pytest.mark.parametrize("check", list(SPOOL_CONTRACT.values()), ids=list(SPOOL_CONTRACT))
@pytest_twisted.ensureDeferred
async def test_jetstreamSpool(natsCluster: Any, tmp_path: Path, check: Any) -> None:
    """
    The jetstream spool on a 3-node cluster, each restart a new connection.
    """
    settings = _settings(natsCluster)
    await check(lambda: jetstreamSpool(tmp_path, inline, None, None, settings))


@pytest.mark.parametrize("check", list(FAILQUEUE_CONTRACT.values()), ids=list(FAILQUEUE_CONTRACT))
@pytest_twisted.ensureDeferred
async def test_jetstreamFailQueue(natsCluster: Any, tmp_path: Path, check: Any) -> None:
    """
    The jetstream fail queue on a 3-node cluster, each restart a new
    connection (and so a new instance).
    """
    clock = Clock()
    clock.advance(1000)
    settings = _settings(natsCluster)
    links: list[Any] = []

    async def make() -> Any:
        backend = jetstreamSpool(tmp_path, inline, None, None, settings)
        queue = jetstreamFailQueue(tmp_path, inline, clock, RetryPolicy(maxAttempts=3), lambda: 0.5, spool=backend)
        await backend.journal.start()
        links.append(backend.journal)
        return queue

    try:
        await check(make, clock)
    finally:
        for journal in links:
            await journal.stop()
