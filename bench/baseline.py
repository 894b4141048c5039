"""
The baseline: a Klein app on the same Twisted that reads the request body
and answers 200 without storing anything.

    python -m bench.baseline PORT
"""

from __future__ import annotations

import sys

from klein import Klein
from twisted.internet import endpoints, reactor
from twisted.web.server import Site


class Baseline:
    app = Klein()

    @app.route("/", branch=True)
    def handle(self, request):  # type: ignore[no-untyped-def]
        request.content.read()
        request.setHeader(b"content-type", b"application/json")
        return b'{"outcome":"stored"}\n'


if __name__ == "__main__":
    site = Site(Baseline().app.resource())
    endpoints.serverFromString(reactor, f"tcp:{sys.argv[1]}:interface=127.0.0.1").listen(site)
    reactor.run()
