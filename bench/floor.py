"""
The floor: the least durable work any server on the default config must do
for a request, done as cheaply as this machine allows, to show how close to
the baseline a durable server can come here.

    python -m bench.floor PORT DIRECTORY

A Klein app on the same Twisted, like the baseline, that before answering
writes each request's body to a file of its own in C{DIRECTORY} (a
filesystem stash's document) and makes it durable. Files of concurrent
requests share one thread-pool hop and one C{syncfs} (group commit); the
app does nothing else: no spool, no SQLite, no undo record, no pointer, no
state record. Whatever it reaches bounds what the full server can reach.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, Callable

from klein import Klein
from twisted.internet import endpoints, reactor
from twisted.internet.defer import Deferred
from twisted.web.server import Site

from apicontainer.blocking import inThreadPool
from apicontainer.storage._durable import syncFilesystem, writeFile
from apicontainer.storage._groupcommit import GroupCommit, Operation, Result, runEach


class Floor:
    app = Klein()

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.count = 0
        self.group = GroupCommit(inThreadPool(reactor, reactor.getThreadPool()), self.writeBatch)

    def writeBatch(self, operations: list[Operation]) -> list[Result]:
        outcomes = runEach(operations)
        syncFilesystem(self.directory)
        return outcomes

    @app.route("/", branch=True)
    def handle(self, request) -> Deferred[bytes]:  # type: ignore[no-untyped-def]
        body = request.content.read()
        self.count += 1
        written = self.group.submit(writeFile, self.directory / str(self.count), [body])
        return written.addCallback(lambda _: stored(request))


def stored(request) -> bytes:  # type: ignore[no-untyped-def]
    """
    The answer of both floors, as short as the baseline's.
    """
    request.setHeader(b"content-type", b"application/json")
    return b'{"outcome":"stored"}\n'


def serve(floor: Callable[[Path], Any]) -> None:
    """
    Serve C{floor(DIRECTORY)}'s Klein app on loopback: C{python -m ... PORT DIRECTORY}.
    """
    directory = Path(sys.argv[2])
    os.makedirs(directory, exist_ok=True)
    site = Site(floor(directory).app.resource())
    endpoints.serverFromString(reactor, f"tcp:{sys.argv[1]}:interface=127.0.0.1").listen(site)
    reactor.run()


if __name__ == "__main__":
    serve(Floor)
