"""Prometheus metrics of one aggregator, and the small HTTP server that exposes them.

Each aggregator owns its own ``CollectorRegistry`` (tests run several in one process, and the
global registry would mix them). The service feeds ``AggregatorMetrics`` where it already
counts (receipts, round open/close, presence); bytes published are read from the connection at
scrape time so they cannot drift from what was sent. ``MetricsServer`` serves ``GET /metrics``
with ``HttpServer`` (aggregator/httpserver.py): no thread outlives the aggregator
(prometheus_client's ``start_http_server`` starts a daemon thread that nothing stops).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import Collector

from aggregator.observability.httpserver import HttpServer, Route

log = logging.getLogger("fedge.aggregator.metrics")

ROUND_SECONDS_BUCKETS = (0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1800, 3600, float("inf"))


class _Gauge(Collector):
    """A gauge read at scrape time from a callable (a value another part of the program keeps)."""

    def __init__(self, name: str, documentation: str, read: Callable[[], float]) -> None:
        self.name, self.documentation, self.read = name, documentation, read

    def collect(self) -> Iterator[Metric]:
        yield GaugeMetricFamily(self.name, self.documentation, value=self.read())


class _Published(Collector):
    """``fedge_bytes_published_total``: what the aggregator's connection has sent, read at scrape time."""

    def __init__(self, read: Callable[[], int]) -> None:
        self.read = read

    def collect(self) -> Iterator[Metric]:
        yield CounterMetricFamily("fedge_bytes_published", "Payload bytes the aggregator published (models, receipts, status)",
                                  value=self.read())


class AggregatorMetrics:
    """The aggregator's counters and gauges, in a registry of their own."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.registry = CollectorRegistry()
        r = self.registry
        self.updates = Counter("fedge_updates", "Updates answered, by receipt status and reason code", ["status", "reason"], registry=r)
        self.bytes_received = Counter("fedge_update_bytes_received", "Update payload bytes received", ["status"], registry=r)
        self.rounds = Counter("fedge_rounds_closed", "Rounds (async: buffers) closed into a new model version", registry=r)
        self.model_version = Gauge("fedge_model_version", "Version of the current global model", registry=r)
        self.round = Gauge("fedge_round", "Number of the open round (async: the buffer's version)", registry=r)
        self.round_accepted = Gauge("fedge_round_accepted_updates", "Updates accepted into the open round", registry=r)
        self.round_target = Gauge("fedge_round_target_updates", "Updates that close the open round", registry=r)
        self.online = Gauge("fedge_online_agents", "Agents whose retained presence says online", registry=r)
        self.dropped = Gauge("fedge_agent_dropped_updates",
                             "Updates the fleet's devices dropped unanswered because their round was over (sum of their presence's count)",
                             registry=r)
        self.round_seconds = Histogram("fedge_round_duration_seconds", "Seconds from a round's opening to its new model",
                                       buckets=ROUND_SECONDS_BUCKETS, registry=r)
        self.accuracy = Gauge("fedge_eval_accuracy", "Held-out accuracy of the latest model (if evaluated)", registry=r)
        self.loss = Gauge("fedge_eval_loss", "Held-out loss of the latest model (if evaluated)", registry=r)
        self.invited = Gauge("fedge_round_invited_devices", "Devices the open round's cohort invites (0: no cohort, everyone trains)",
                             registry=r)
        self.evals = Counter("fedge_evals", "Federated evaluation reports, by status (accepted, refused) and reason code",
                             ["status", "reason"], registry=r)
        self.federated_figures = {
            name: Gauge(f"fedge_federated_{name}", f"Federated evaluation of the newest evaluated model: {doc}", registry=r)
            for name, doc in (("accuracy", "sample-weighted accuracy on the devices' held-out data"),
                              ("loss", "sample-weighted loss on the devices' held-out data"),
                              ("devices", "devices that reported"), ("samples", "held-out samples they evaluated"),
                              ("accuracy_min", "the worst device's accuracy"), ("accuracy_p10", "10th percentile of the devices' accuracies"),
                              ("version", "the model version evaluated"))
        }
        self._broadcast_metrics(r)
        self._published = _Published(lambda: 0)
        r.register(self._published)
        self._stall = _Gauge("fedge_event_loop_longest_stall_seconds",
                             "Longest time the aggregator's event loop was kept from running (keepalives and receipts wait meanwhile)",
                             lambda: 0.0)
        r.register(self._stall)
        self._opened: float | None = None

    def _broadcast_metrics(self, r: CollectorRegistry) -> None:
        """Bytes down next to bytes up (``fedge_update_bytes_received``): what each version cost to reach the fleet."""
        self.broadcast_bytes = Counter(
            "fedge_broadcast_bytes",
            "Bytes of model broadcasts published, by kind: announcement (what every device downloads), keyframe, retained "
            "(deltas kept for catch-up) and task (these three only devices that catch up download)", ["kind"], registry=r)
        self.announcement_bytes = Gauge("fedge_broadcast_announcement_bytes",
                                        "Bytes each device downloads for the latest announcement (a delta, or the whole model)", registry=r)
        self.catch_up_bytes = Gauge("fedge_broadcast_catch_up_bytes",
                                    "Delta broadcasts: what a device that holds nothing downloads now (the keyframe and retained deltas)",
                                    registry=r)
        self.catch_up_worst = Gauge("fedge_broadcast_catch_up_worst_bytes",
                                    "Delta broadcasts: the most a device can download to catch up under the keyframe policy", registry=r)
        self.keyframes = Counter("fedge_broadcast_keyframes", "Delta broadcasts: keyframes taken", registry=r)
        self.keyframe_requests = Counter("fedge_broadcast_keyframe_requests",
                                         "Delta broadcasts: keyframes requested because devices reported catch-up failures", registry=r)
        self.encode_seconds = Gauge("fedge_broadcast_encode_seconds",
                                    "Delta broadcasts: seconds to encode the latest version (delta, held model, hash, state)", registry=r)
        self.failing = Gauge("fedge_broadcast_devices_failing",
                             "Delta broadcasts: devices whose presence reports a catch-up failure since the current keyframe", registry=r)

    def broadcast_sent(self, *, announcement: int, keyframe: int = 0, retained: int = 0, task: int = 0) -> None:
        for kind, nbytes in (("announcement", announcement), ("keyframe", keyframe), ("retained", retained), ("task", task)):
            self.broadcast_bytes.labels(kind=kind).inc(nbytes)
        self.announcement_bytes.set(announcement)

    def broadcast_catch_up(self, now: int, worst: int) -> None:
        self.catch_up_bytes.set(now)
        self.catch_up_worst.set(worst)

    def broadcast_keyframe(self) -> None:
        self.keyframes.inc()

    def broadcast_keyframe_requested(self) -> None:
        self.keyframe_requests.inc()

    def broadcast_prepared(self, seconds: float) -> None:
        self.encode_seconds.set(seconds)

    def broadcast_failing(self, devices: int) -> None:
        self.failing.set(devices)

    def watch_published(self, read: Callable[[], int]) -> None:
        """Report ``read()`` as the bytes published (the current connection's count)."""
        self._published.read = read

    def watch_stall(self, read: Callable[[], float]) -> None:
        """Report ``read()`` as the event loop's longest stall (fedge_runtime.loop_stall)."""
        self._stall.read = read

    def receipt(self, status: str, reason: str, nbytes: int) -> None:
        self.updates.labels(status=status, reason=reason.split(":", 1)[0]).inc()
        self.bytes_received.labels(status=status).inc(nbytes)

    def round_opened(self, number: int, version: int, accepted: int, target: int) -> None:
        if self._opened is None:  # an extension or re-announcement is the same round
            self._opened = self.clock()
        self.round.set(number)
        self.model_version.set(version)
        self.round_accepted.set(accepted)
        self.round_target.set(target)

    def accepted(self, count: int) -> None:
        self.round_accepted.set(count)

    def round_closed(self, version: int, metrics: dict[str, float]) -> None:
        if self._opened is not None:
            self.round_seconds.observe(self.clock() - self._opened)
            self._opened = None
        self.rounds.inc()
        self.model_version.set(version)
        if "accuracy" in metrics:
            self.accuracy.set(metrics["accuracy"])
        if "loss" in metrics:
            self.loss.set(metrics["loss"])

    def cohort(self, invited: int) -> None:
        self.invited.set(invited)

    def evaluation(self, status: str, reason: str) -> None:
        self.evals.labels(status=status, reason=reason).inc()

    def federated(self, figures: dict[str, float]) -> None:
        """The ``fed_*`` figures of the newest evaluated version (observability/federated_eval.py)."""
        for name, gauge in self.federated_figures.items():
            if f"fed_{name}" in figures:
                gauge.set(figures[f"fed_{name}"])

    def online_agents(self, count: int) -> None:
        self.online.set(count)

    def dropped_updates(self, count: int) -> None:
        self.dropped.set(count)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class MetricsServer(HttpServer):
    """``GET /metrics`` over HTTP/1.0 on ``host:port`` (port 0: a free one, see ``.port``) while the block runs."""

    def __init__(self, render: Callable[[], bytes], host: str = "127.0.0.1", port: int = 0, *, path: str = "/metrics") -> None:
        async def exposition() -> bytes:
            return render()  # in-memory counters: rendering takes microseconds

        super().__init__({path: Route(CONTENT_TYPE_LATEST, exposition)}, host, port, name="metrics")
        self.path = path
