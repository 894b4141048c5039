"""
The configuration loader accepts the shipped configs and refuses every
mistake with one line naming the file, line, key and problem.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from apicontainer.blocking import inline
from apicontainer.config import DEFAULT_CONFIG, ConfigError, loadConfig
from apicontainer.pipeline import buildStashes
from apicontainer.stashes import StashContext

GOOD = """\
listen: "tcp:0:interface=127.0.0.1"
admin_listen: "tcp:0:interface=127.0.0.1"
data_dir: ./var
stashes:
  records: {type: sqlite, path: records.sqlite3}
  files: {type: filesystem, root: files}
routes:
  - path: /items/<id>
    stashes: [records, files]
    read: [records]
"""


class ConfigTests(SynchronousTestCase):
    def write(self, text: str) -> Path:
        path = Path(self.mktemp())
        path.write_text(textwrap.dedent(text))
        return path

    def refused(self, text: str, build: bool = False) -> str:
        path = self.write(text)
        with self.assertRaises(ConfigError) as caught:
            config = loadConfig(path)
            if build:
                buildStashes(config, StashContext(None, Path("."), inline, lambda name: inline))  # type: ignore[arg-type]
        message = str(caught.exception)
        self.assertNotIn("\n", message)
        self.assertTrue(message.startswith(str(path)), message)
        return message[len(str(path)) :]

    def test_defaultConfig(self) -> None:
        """
        The embedded default loads: SQLite + filesystem under ./var, the
        documented defaults filled in.
        """
        config = loadConfig(DEFAULT_CONFIG)
        self.assertEqual(list(config.stashes), ["records", "files"])
        self.assertEqual(config.dataDir, Path("var"))
        self.assertEqual(config.limits.maxBodyBytes, 10485760)
        self.assertEqual(config.retry.maxAttempts, 20)
        self.assertEqual(config.stashes["records"].concurrency, 16)
        self.assertEqual(config.stashes["records"].timeout, 30.0)
        self.assertEqual(config.routes[0].stashes, ("records", "files"))

    def test_examples(self) -> None:
        """
        Every example config in the repository loads and builds.
        """
        examples = sorted((Path(__file__).parents[2] / "examples").glob("*.yaml"))
        self.assertTrue(examples)
        for path in examples:
            config = loadConfig(path)
            buildStashes(config, StashContext(None, Path("."), inline, lambda name: inline))  # type: ignore[arg-type]

    def test_unknownStashType(self) -> None:
        """
        An unknown type is named with the known ones, on its line.
        """
        message = self.refused(GOOD.replace("type: filesystem", "type: filesytem"))
        self.assertEqual(
            message,
            ":6: stashes.files.type: unknown stash type 'filesytem' (known: filesystem, http, postgres, redis, sqlite)",
        )

    def test_undeclaredStash(self) -> None:
        """
        A route naming an undeclared stash is refused on the route's line.
        """
        message = self.refused(GOOD.replace("[records, files]", "[records, cache]"))
        self.assertEqual(
            message,
            ":9: routes[0].stashes: names stash 'cache', which is not declared"
            " (declared: records, files)",
        )

    def test_badEndpoint(self) -> None:
        """
        An endpoint string Twisted cannot parse is refused with its reason.
        """
        message = self.refused(GOOD.replace('"tcp:0:interface=127.0.0.1"\nadmin', '"tcpp:80"\nadmin'))
        self.assertTrue(message.startswith(":1: listen: bad endpoint string 'tcpp:80'"), message)

    def test_errorTextOnOneLine(self) -> None:
        """
        A refusal stays on one line when the reason a library gives holds a
        line break (Twisted's, for an endpoint string of one): the break is
        written as its escape.
        """
        message = self.refused(GOOD.replace('"tcp:0:interface=127.0.0.1"\nadmin', '"\\n"\nadmin'))
        self.assertEqual(message, ":1: listen: bad endpoint string '\\n': Unknown endpoint type: '\\n'")

    def test_missingPath(self) -> None:
        """
        A route without a path, and a sqlite stash without one, are refused.
        """
        self.assertEqual(
            self.refused(GOOD.replace("  - path: /items/<id>\n    stashes", "  - stashes")),
            ":8: routes[0].path: is required",
        )
        self.assertEqual(
            self.refused(GOOD.replace("{type: sqlite, path: records.sqlite3}", "{type: sqlite}"), build=True),
            ":5: stashes.records.path: is required",
        )

    def test_unknownKeys(self) -> None:
        """
        A misspelt key, at the top or in a stash, is refused with the known ones.
        """
        self.assertIn(":3: data_dri: unknown key", self.refused(GOOD.replace("data_dir", "data_dri")))
        message = self.refused(GOOD.replace("root: files}", "root: files, prat: a}"), build=True)
        self.assertTrue(message.startswith(":6: stashes.files.prat: unknown key (known here: concurrency, part, process, root, timeout_s, type)"), message)

    def test_misspeltRequiredKey(self) -> None:
        """
        A misspelt required key is named as unknown, on its own line, not
        reported as the missing key it was meant to be: at the top, in a
        route, and in a stash's own options.
        """
        self.assertEqual(
            self.refused(GOOD.replace("routes:", "rootes:")),
            ":7: rootes: unknown key (did you mean 'routes'?)",
        )
        self.assertEqual(
            self.refused(GOOD.replace("  - path: /items", "  - pth: /items")),
            ":8: routes[0].pth: unknown key (did you mean 'path'?)",
        )
        self.assertEqual(
            self.refused(GOOD.replace("path: records.sqlite3", "pat: records.sqlite3"), build=True),
            ":5: stashes.records.pat: unknown key (did you mean 'path'?)",
        )
        self.assertEqual(
            self.refused(GOOD + "limitz: {max_in_flight: 3}\n"),
            ":11: limitz: unknown key (did you mean 'limits'?)",
        )

    def test_backends(self) -> None:
        """
        spool.backend and failqueue.backend default to file, take file, and
        refuse anything else with the known ones.
        """
        config = loadConfig(self.write(GOOD))
        self.assertEqual((config.spoolBackend, config.failqueueBackend), ("file", "file"))
        explicit = loadConfig(self.write(GOOD + "spool: {backend: file}\nfailqueue: {backend: file}\n"))
        self.assertEqual((explicit.spoolBackend, explicit.failqueueBackend), ("file", "file"))
        self.assertEqual(
            self.refused(GOOD + "spool: {backend: tape}\n"),
            ":11: spool.backend: unknown spool backend 'tape' (known: file, jetstream)",
        )
        self.assertEqual(
            self.refused(GOOD + "failqueue: {backend: tape}\n"),
            ":11: failqueue.backend: unknown fail queue backend 'tape' (known: file, jetstream)",
        )
        self.assertIn(":11: spool.backnd: unknown key", self.refused(GOOD + "spool: {backnd: file}\n"))
        self.assertIn(":11: spool.servers: unknown key", self.refused(GOOD + "spool: {servers: [nats://a:4222]}\n"))

    def test_jetstream(self) -> None:
        """
        The jetstream spool's keys, with their defaults; the jetstream fail
        queue needs the jetstream spool; a stash that keeps its data on this
        machine is refused beside it, naming the stash.
        """
        shared = GOOD.replace(
            "stashes:\n  records: {type: sqlite, path: records.sqlite3}\n  files: {type: filesystem, root: files}",
            "stashes:\n  records: {type: redis, url: 'redis://127.0.0.1:6379/0'}\n"
            "  files: {type: http, url: 'http://127.0.0.1:9/'}",
        )
        spool = "spool:\n  backend: jetstream\n  servers: [nats://n1:4222, nats://n2:4222]\n"
        config = loadConfig(self.write(shared + spool + "failqueue: {backend: jetstream}\n"))
        settings = config.jetstream
        assert settings is not None
        self.assertEqual(
            (settings.servers, settings.stream, settings.partitions, settings.replicas, settings.ackWait),
            (("nats://n1:4222", "nats://n2:4222"), "APICONTAINER", 64, 3, 10.0),
        )
        self.assertEqual(settings.partitionOf("/items/1"), settings.partitionOf("/items/1"))
        self.assertEqual(
            len({settings.partitionOf(f"/items/{n}") for n in range(1000)}), 64, "keys spread on every partition"
        )
        tuned = loadConfig(
            self.write(shared + spool + "  stream: ORDERS\n  partitions: 16\n  replicas: 1\n  ack_wait_s: 30\n")
        ).jetstream
        assert tuned is not None
        self.assertEqual((tuned.stream, tuned.partitions, tuned.replicas, tuned.ackWait), ("ORDERS", 16, 1, 30.0))
        self.assertEqual(
            self.refused(shared + "failqueue: {backend: jetstream}\n"),
            ":11: failqueue.backend: jetstream needs spool.backend: jetstream (the same cluster)",
        )
        self.assertIn("spool.servers: 'n1:4222' is not a NATS URL", self.refused(shared + "spool: {backend: jetstream, servers: ['n1:4222']}\n"))
        self.assertIn("spool.servers: ", self.refused(shared + "spool: {backend: jetstream}\n"))
        self.assertIn("spool.stream: 'a.b'", self.refused(shared + spool + "  stream: a.b\n"))
        self.assertIn("spool.replicas: 7", self.refused(shared + spool + "  replicas: 7\n"))
        downstream = shared.replace("records: {type: redis, url: 'redis://127.0.0.1:6379/0'}", "records: {type: http, url: 'http://127.0.0.1:9/'}")
        self.assertIn("stashes.records: a http stash keeps data on this machine's disk", self.refused(downstream + spool, build=True))
        local = self.refused(GOOD + spool, build=True)
        self.assertIn(": stashes.records: a sqlite stash keeps data on this machine's disk", local)
        self.assertIn("use a store every instance reaches", local)

    def test_exposedWithoutTokens(self) -> None:
        """
        An endpoint that other machines can reach (no interface, or a
        non-loopback one) with no bearer tokens is refused, naming the key
        and how to fix it, unless auth.open_to_network says it is on
        purpose. Loopback and UNIX sockets need no tokens.
        """
        exposed = GOOD.replace('admin_listen: "tcp:0:interface=127.0.0.1"', 'admin_listen: "tcp:0"')
        message = self.refused(exposed)
        self.assertTrue(message.startswith(":2: admin_listen: 'tcp:0' is reachable from other machines"), message)
        self.assertIn("auth.open_to_network: true", message)
        self.assertIn(
            ":1: listen: 'tcp:0:interface=10.1.2.3' is reachable",
            self.refused(GOOD.replace("tcp:0:interface=127.0.0.1", "tcp:0:interface=10.1.2.3", 1)),
        )
        self.assertTrue(loadConfig(self.write(exposed + "auth: {open_to_network: true}\n")).openToNetwork)
        tokens = self.write("0" * 64 + "\n")
        loadConfig(self.write(exposed + f"auth: {{tokens_file: {tokens}}}\n"))
        loadConfig(self.write(GOOD.replace('"tcp:0:interface=127.0.0.1"', '"unix:/tmp/ac.sock"', 1)))

    def test_wrongTypes(self) -> None:
        """
        Values of the wrong type or range are refused.
        """
        self.assertEqual(
            self.refused(GOOD + "limits: {max_body_bytes: -1}\n"),
            ":11: limits.max_body_bytes: must be a whole number >= 1, not -1",
        )
        self.assertIn(
            "stashes.records.concurrency: must be a whole number >= 1",
            self.refused(GOOD.replace("path: records.sqlite3}", "path: r, concurrency: 0}")),
        )
        self.assertIn(
            "routes[0].stashes: names records more than once",
            self.refused(GOOD.replace("[records, files]", "[records, records]")),
        )

    def test_readerCheck(self) -> None:
        """
        A read component must be able to read.
        """
        from apicontainer.config import _registry as registry

        self.patch(registry, "BUILTIN", {**registry.BUILTIN, "blind": "tests.server.test_config:BlindStash.factory"})
        message = self.refused(
            GOOD.replace("{type: filesystem, root: files}", "{type: blind}").replace("read: [records]", "read: [files]"),
            build=True,
        )
        self.assertEqual(message, ":10: routes[0].read: stash 'files' (type blind) cannot read")

    def test_yamlErrors(self) -> None:
        """
        Broken YAML, an empty file and a missing file are each one line.
        """
        self.assertTrue(self.refused("listen: [\n").startswith(":2: not valid YAML"))
        self.assertEqual(self.refused(""), ":1: the configuration is empty")
        with self.assertRaises(ConfigError) as caught:
            loadConfig(Path("/nonexistent/config.yaml"))
        self.assertIn("cannot read the configuration", str(caught.exception))

    def test_reservedRoute(self) -> None:
        """
        Routes may not start with /_, which the admin API uses.
        """
        self.assertIn("reserved", self.refused(GOOD.replace("/items/<id>", "/_uow/<id>")))


from zope.interface import implementer  # noqa: E402

from apicontainer.interfaces import IStash  # noqa: E402


@implementer(IStash)
class BlindStash:
    """
    A stash that cannot read, for the reader check.
    """

    def __init__(self, name: str) -> None:
        self.name = name

    @classmethod
    def factory(cls, spec, context):  # type: ignore[no-untyped-def]
        return cls(spec.name)

    def stash(self, uow):  # type: ignore[no-untyped-def]
        raise NotImplementedError

    rollback = commit = stash
