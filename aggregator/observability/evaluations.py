"""Federated evaluation in the round loop: which announcements ask for it, the devices' reports, the figures.

``[rounds] eval_every N`` puts the ``eval`` threshold (a ``eval_fraction`` of the devices, by a hash
rule anyone can check: fedge_contract/cohort.py) into the announcement of every N-th model version
and of the final one. The asked devices evaluate that version on their own held-out split and
publish a small JSON report on ``fl/<fleet>/evals/<client>``; the coordinator's connection
subscribes to ``evals/+`` and hands each report here, never to the update ingest path (reports are
~170 bytes of JSON, not tensors, and get no receipt).

One ``EvalCollector`` per asked version (observability/federated_eval.py) keeps one report per asked
device. The sample-weighted figures of version ``v`` (``fed_accuracy``, ``fed_loss``...) belong to
round ``v``, the round that produced it, and arrive while round ``v + 1`` is open: they are merged
into that round's stored metrics (``Store.update_round_metrics``) at most every ``FLUSH_EVERY``
seconds and whenever a round closes, so a thousand reports cost a handful of durable writes, not a
thousand. Version 0 has no round: its figures go to the status and Prometheus only.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping

from aggregator.observability.federated_eval import EvalCollector, eval_due
from aggregator.observability.metrics import AggregatorMetrics
from aggregator.store import Store, StoreAccess, call
from fedge_contract import DecodeError, Presence
from fedge_contract.cohort import Participation, eval_threshold
from fedge_contract.evaluation import EvalReport

log = logging.getLogger("fedge.aggregator")

FLUSH_EVERY = 2.0  # seconds: the figures of arriving reports reach the store at most this stale
KEEP_VERSIONS = 3  # asked versions whose reports are still taken (a slow device's report of an older one counts)


class Evaluations:
    """The federated evaluation of one aggregator's model versions (see the module docstring)."""

    def __init__(self, fleet: str, every: int, fraction: float, metrics: AggregatorMetrics, *, max_samples: int | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.fleet = fleet
        self.every = every
        self.threshold = eval_threshold(fraction)
        self.metrics = metrics
        self.max_samples = max_samples
        self.clock = clock
        self.collectors: dict[int, EvalCollector] = {}  # asked version -> its reports
        self.latest: dict[str, float] = {}  # the figures of the newest version with reports (RoundStatus, dashboard)
        self._dirty: set[int] = set()  # versions whose figures changed since the last flush
        self._flushed = clock()

    def ask(self, version: int, final: bool = False) -> int | None:
        """The eval threshold of the announcement of ``version`` (None: it asks nobody); its reports are taken from now on."""
        if not eval_due(version, self.every, final=final):
            return None
        if version not in self.collectors:
            self.collectors[version] = EvalCollector(self.fleet, version, Participation(None, self.threshold), self.max_samples)
            for old in sorted(self.collectors)[:-KEEP_VERSIONS]:
                del self.collectors[old]
        return self.threshold

    def offer(self, client: str, payload: bytes) -> None:
        """One report from ``client``'s topic: kept, or refused with a reason (logged and counted)."""
        try:
            version = EvalReport.from_bytes(payload, fleet=self.fleet).model_version
        except DecodeError as exc:
            self._refused(client, str(exc))
            return
        collector = self.collectors.get(version)
        if collector is None:
            self._refused(client, f"stale: no evaluation of v{version} is being collected")
            return
        reason = collector.offer(client, payload)
        if reason is not None:
            self._refused(client, reason)
            return
        self.metrics.evaluation("accepted", "")
        figures = collector.metrics()
        assert figures is not None
        if not self.latest or version >= int(self.latest["fed_version"]):
            self.latest = figures.as_metrics()
            self.metrics.federated(self.latest)
        self._dirty.add(version)

    def _refused(self, client: str, reason: str) -> None:
        log.warning("evaluation report from %s refused: %s", client, reason, extra={"client": client, "reason": reason})
        self.metrics.evaluation("refused", reason.split(":", 1)[0])

    def figures(self, version: int) -> dict[str, float]:
        collector = self.collectors.get(version)
        found = collector.metrics() if collector is not None else None
        return found.as_metrics() if found is not None else {}

    def due(self) -> bool:
        """Figures changed and the last flush is FLUSH_EVERY old."""
        return bool(self._dirty) and self.clock() - self._flushed >= FLUSH_EVERY

    async def flush(self, db: StoreAccess) -> None:
        """Merge the changed versions' figures into their rounds' stored metrics (durably)."""
        dirty, self._dirty, self._flushed = sorted(self._dirty), set(), self.clock()
        for version in dirty:
            if version >= 1:  # version v is round v's model; v0 has no round
                await call(db, Store.update_round_metrics, version, self.figures(version))

    def reported(self, version: int) -> set[str]:
        collector = self.collectors.get(version)
        return set(collector.reports) if collector is not None else set()

    def awaited(self, version: int, devices: Mapping[str, Presence]) -> set[str]:
        """The online devices asked to evaluate ``version`` that have not reported yet (the final model's wait)."""
        collector = self.collectors.get(version)
        if collector is None:
            return set()
        rule = collector.request
        return {c for c, p in devices.items() if p.state == "online" and c not in collector.reports
                and rule.asks_eval(c, fleet=self.fleet, model_version=version)}
