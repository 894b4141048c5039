"""
Prometheus metrics, served by the admin API at C{GET /metrics}.

Each container has a registry of its own, so tests and reloads never mix
their counts.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from ..uow import FAILED

if TYPE_CHECKING:
    from ._container import Container

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
SIZE_BUCKETS = (256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304, 16777216)


class Metrics:
    """
    The counters, gauges and histograms of one container.
    """

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.uows = Counter(
            "apicontainer_uows", "UOWs settled, by route and final or waiting state.", ["route", "state"], registry=r
        )
        self.verdicts = Counter(
            "apicontainer_stash_verdicts", "Stash verdicts, by stash, verdict and status.", ["stash", "verdict", "status"], registry=r
        )
        self.latency = Histogram(
            "apicontainer_stash_seconds", "How long stash calls took, by stash.", ["stash"], buckets=LATENCY_BUCKETS, registry=r
        )
        self.rollbacks = Counter(
            "apicontainer_rollbacks", "Rollbacks sent to stashes, by stash and result (ok, failed).", ["stash", "result"], registry=r
        )
        self.requestBytes = Histogram(
            "apicontainer_request_bytes", "Sizes of mutation bodies accepted by ingress.", buckets=SIZE_BUCKETS, registry=r
        )
        self.recovered = Counter(
            "apicontainer_recovered", "UOWs handled by recovery at start, by what happened.", ["what"], registry=r
        )
        self.retries = Counter("apicontainer_retries", "Attempts started by the retry engine.", registry=r)
        self._children: dict[tuple[object, ...], Any] = {}

    def of(self, metric: Any, *labels: object) -> Any:
        """
        C{metric}'s child for C{labels}, looked up once per label set: on the
        path of every request, a lookup by labels cost more than the count.
        """
        key = (metric, *labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*map(str, labels))
        return child

    def watch(self, container: Container) -> None:
        """
        Add the gauges read from C{container} at each scrape.
        """
        self.registry.register(_ContainerGauges(container))
        if container.link is not None:
            publish = Histogram(
                "apicontainer_publish_seconds",
                "How long the stream took to acknowledge a UOW (replicated to a quorum).",
                buckets=LATENCY_BUCKETS,
                registry=self.registry,
            )
            container.link.publishLatency = publish.observe
        self.inFlight = Gauge("apicontainer_in_flight", "UOWs spooled and not yet settled.", registry=self.registry)
        self.inFlight.set_function(lambda: container.records.inFlight)
        self.unsettled = Gauge(
            "apicontainer_unsettled",
            "UOWs whose outcome could not be made durable; re-driven until they settle.",
            registry=self.registry,
        )
        self.unsettled.set_function(lambda: len(container.fanout.unsettled) if container.fanout else 0)

    def exposition(self) -> bytes:
        """
        The metrics in the Prometheus text format.
        """
        return generate_latest(self.registry)


class _ContainerGauges(Collector):
    def __init__(self, container: Container) -> None:
        self._container = container

    def collect(self) -> Iterator[GaugeMetricFamily]:
        failQueue = self._container.failQueue
        depth = GaugeMetricFamily("apicontainer_failqueue", "UOWs in the fail queue, by state.", labels=["state"])
        for state in FAILED:
            depth.add_metric([state.value], len(failQueue.list(state)))
        yield depth
        files = total = 0
        try:
            for entry in os.scandir(self._container.spool.directory):
                if entry.name.endswith(".uow"):
                    files += 1
                    total += entry.stat().st_size
        except OSError:
            pass
        yield GaugeMetricFamily("apicontainer_spool_files", "Spool files: UOWs not yet final.", value=files)
        yield GaugeMetricFamily("apicontainer_spool_bytes", "Bytes in spool files.", value=total)
        cluster = self._container.clusterStatus()
        if cluster is not None:
            yield GaugeMetricFamily(
                "apicontainer_cluster_connected", "1 while the JetStream link is up.", value=int(cluster["connected"])
            )
            yield GaugeMetricFamily(
                "apicontainer_partitions_consumed",
                "Partitions this instance is bound to.",
                value=cluster["partitions_consumed"],
            )
            yield GaugeMetricFamily(
                "apicontainer_redeliveries",
                "UOWs delivered to this instance more than once (another died, or one was put back).",
                value=cluster["redeliveries"],
            )
