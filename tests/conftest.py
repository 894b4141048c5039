"""
Fixtures that run the real server, `twist apicontainer`, on loopback.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import time
from contextlib import contextmanager
from pathlib import Path
from unittest import mock
from typing import Any, Iterator

import pytest

TWIST = [str(Path(sys.executable).parent / "twist")]


@contextmanager
def filesCreated() -> Iterator[list[str]]:
    """
    The names of the files that C{os.open} created while in the block.
    """
    created: list[str] = []
    realOpen = os.open

    def counting(path: Any, flags: int, *args: Any) -> int:
        if flags & os.O_CREAT and not os.path.lexists(path):
            created.append(Path(path).name)
        return realOpen(path, flags, *args)

    with mock.patch.object(os, "open", counting):
        yield created


def holdsBytes(path: Path) -> bool:
    """
    Whether C{path} holds anything but zeros: an emptied spool spare holds
    only zeros, where a request's bytes were.
    """
    return bool(path.read_bytes().strip(b"\0"))


def freePort() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PortTaken(RuntimeError):
    """
    The server could not listen: a port was taken.
    """

    def __init__(self, message: str, port: int) -> None:
        super().__init__(message)
        self.port = port


class RunningServer:
    """
    A `twist apicontainer` subprocess with its ports and data directory.
    """

    def __init__(self, directory: Path, config: str, reactor: str | None = None) -> None:
        """
        @param reactor: The reactor to ask twist for (C{asyncio} for the
            jetstream backends), else twist's default.
        """
        self.directory = directory
        self.reactor = reactor
        self.port = freePort()
        self.adminPort = freePort()
        self.dataDir = directory / "var"
        self.configPath = directory / "config.yaml"
        self.configPath.write_text(
            textwrap.dedent(config).format(
                port=self.port, admin=self.adminPort, data=self.dataDir
            )
        )
        self.log = directory / "server.log"
        self.process: subprocess.Popen[bytes] | None = None
        self.adminHeaders: dict[str, str] = {}

    def start(self, env: dict[str, str] | None = None) -> None:
        """
        Start the server and wait until its admin API answers, which is after
        recovery.

        @param env: Extra environment variables (a crash point to arm).
        """
        for _ in range(3):
            try:
                return self._start(env)
            except PortTaken as e:
                # A port picked free was taken by another socket before the
                # server bound it (an outgoing connection's ephemeral port):
                # pick others. A port the config chose itself is left as is.
                if e.port not in (self.port, self.adminPort):
                    raise
                text = self.configPath.read_text()
                for attribute in ("port", "adminPort"):
                    old, new = getattr(self, attribute), freePort()
                    text = text.replace(f"tcp:{old}:", f"tcp:{new}:")
                    setattr(self, attribute, new)
                self.configPath.write_text(text)
        self._start(env)

    def _start(self, env: dict[str, str] | None) -> None:
        logged = self.log.stat().st_size if self.log.exists() else 0
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                [*TWIST, *([f"--reactor={self.reactor}"] if self.reactor else []), "apicontainer", "--config", str(self.configPath)],
                cwd=self.directory,
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, **(env or {})},
            )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                exited = f"server exited with {self.process.returncode}:\n{self.log.read_text()[-3000:]}"
                taken = re.search(r"listen on [\d.]+:(\d+): \[Errno 98\]", self.log.read_text()[logged:])
                if taken:
                    raise PortTaken(exited, int(taken[1]))
                raise RuntimeError(f"server exited with {self.process.returncode}:\n{self.log.read_text()[-3000:]}")
            try:
                if self.admin("GET", "/_health")[0] in (200, 401):
                    return
            except OSError:
                time.sleep(0.1)
        raise RuntimeError("server did not become healthy in 30s")

    def waitForDeath(self, timeout: float = 30) -> int:
        """
        Wait for the process to end by itself (at an armed crash point).
        """
        assert self.process is not None
        return self.process.wait(timeout)

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """
        Send C{sig} and wait for the server to end. One that does not end
        within 30 s is killed, so that no test leaves a server behind, and
        the test fails.
        """
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(30)
                raise AssertionError(f"the server did not stop within 30 s of signal {sig}") from None

    def _call(self, port: int, method: str, path: str, body: bytes | None, headers: dict[str, str]) -> tuple[int, dict[str, str], bytes]:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        try:
            connection.request(method, path, body=body, headers=headers)
            response = connection.getresponse()
            return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
        finally:
            connection.close()

    def request(self, method: str, path: str, body: bytes | None = None, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
        """
        A blocking request to ingress.
        """
        return self._call(self.port, method, path, body, headers or {})

    def admin(self, method: str, path: str) -> tuple[int, Any]:
        """
        A blocking request to the admin API; the JSON body decoded.
        """
        status, _, body = self._call(self.adminPort, method, path, None, self.adminHeaders)
        return status, json.loads(body)


DEFAULT = """\
listen: "tcp:{port}:interface=127.0.0.1"
admin_listen: "tcp:{admin}:interface=127.0.0.1"
data_dir: {data}
limits: {{max_body_bytes: 65536}}
stashes:
  records: {{type: sqlite, path: records.sqlite3}}
  files: {{type: filesystem, root: files}}
routes:
  - path: /items/<id>
    stashes: [records, files]
    read: [records, files]
"""


@pytest.fixture
def server(tmp_path: Path) -> Iterator[RunningServer]:
    """
    The real server on the SQLite + filesystem config, on free loopback ports.
    """
    running = RunningServer(tmp_path, DEFAULT)
    running.start()
    try:
        yield running
    finally:
        running.kill(signal.SIGTERM)


@pytest.fixture(scope="session")
def natsCluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """
    A 3-node JetStream cluster on loopback (C{sync_interval: always}),
    shared by the tests of a run: each uses a stream of its own.
    """
    from apicontainer.testing import NATSCluster
    from tests.services import requireJetStream

    requireJetStream()
    cluster = NATSCluster(tmp_path_factory.mktemp("nats"))
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()
