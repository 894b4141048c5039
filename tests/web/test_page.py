"""
The fail-queue page in a real browser: headless Chromium, driven by
Playwright, against the real patient.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import DEFAULT, RunningServer

pytestmark = pytest.mark.integration


@pytest.fixture
def patient(tmp_path: Path) -> RunningServer:
    """
    The real server with a retry schedule slow enough for a person to act.
    """
    server = RunningServer(tmp_path, DEFAULT + "failqueue: {{retry: {{initial_s: 600}}}}\n")
    server.start()
    yield server
    server.kill()


def test_retryFromThePage(patient: RunningServer, tmp_path: Path) -> None:
    """
    An operator opens the admin page, sees the failed UOW with its stash
    report, filters by state, clicks Retry, confirms, and sees the UOW
    leave the queue and its state become stored.
    """
    if not Path("/usr/bin/chromium").exists():
        reason = "Debian's chromium is not installed (apt-get install chromium)"
        if os.environ.get("APICONTAINER_REQUIRE_SERVICES") == "1":
            pytest.fail(reason)
        pytest.skip(reason)
    root = patient.dataDir / "files"
    shutil.move(root, patient.dataDir / "away")
    root.write_bytes(b"")
    uow = json.loads(patient.request("PUT", "/items/1", b"x")[2])["uow"]
    root.unlink()
    shutil.move(patient.dataDir / "away", root)
    screenshot = Path(os.environ.get("APICONTAINER_PAGE_SCREENSHOT", tmp_path / "page.png"))
    result = subprocess.run(
        [sys.executable, "-m", "tests.pagecheck", f"http://127.0.0.1:{patient.adminPort}/", str(uow), str(screenshot)],
        capture_output=True, text=True, timeout=120, cwd=Path(__file__).parents[2],
    )
    assert result.returncode == 0, result.stderr[-3000:]
    seen = json.loads(result.stdout.splitlines()[-1])
    assert "queued" in seen["before"] and "files: failed 503" in seen["before"]
    assert seen["dialogs"] == [f"Retry UOW {uow} now?"]
    assert seen["status"].endswith("UOW(s), " + seen["status"].split(", ")[-1]) and seen["status"].startswith("0 UOW(s)")
    assert seen["detail"] == "stored"
    assert screenshot.stat().st_size > 1000
    assert patient.admin("GET", "/_failed")[1] == {"failed": []}
