"""
The file backends of the spool and of the fail queue keep the backend
contract (apicontainer.testing.SPOOL_CONTRACT and FAILQUEUE_CONTRACT), which
any other backend must keep too: with the journal in the server's threads
and in its child process.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.task import Clock

from apicontainer.blocking import inline
from apicontainer.storage import RetryPolicy, fileFailQueue, fileSpool
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
