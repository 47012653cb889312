"""Federated evaluation: the devices' reports of one model version, reduced to fleet metrics.

Pure logic: the round loop hands each message from ``fl/<fleet>/evals/<client>`` to an
``EvalCollector`` for the announced version and publishes ``reduce_reports`` of what it kept.

- *Which reports count:* one per device per version, from a device the announcement asked
  (``Participation.asks_eval``: anyone can check the hash rule), about that version, sent on the
  device's own topic. Anything else is refused with a reason (logged and counted; reports get no
  receipts, see fedge_contract/evaluation.py).
- *The reduction:* loss and accuracy weighted by each device's sample count, i.e. exactly what
  one evaluation over the union of the reporting devices' held-out data would give. A device's
  weight can be capped (``max_samples``), as ``--max-weight`` caps an update's: a device claiming
  a billion samples cannot decide the fleet's accuracy alone. The unweighted spread across devices
  (lowest, 10th percentile) says how the model does for its worst-served devices, which the
  weighted mean hides.
- *When:* ``eval_due`` asks every ``every``-th version, and the final one.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field

from fedge_contract import DecodeError
from fedge_contract.cohort import Participation
from fedge_contract.evaluation import EvalReport

__all__ = ["EvalCollector", "FederatedMetrics", "eval_due", "reduce_reports"]


@dataclass(frozen=True)
class FederatedMetrics:
    """Sample-weighted loss and accuracy of one model version over the devices that reported."""

    model_version: int
    devices: int
    samples: int
    loss: float
    accuracy: float
    accuracy_min: float  # the worst device's accuracy (unweighted)
    accuracy_p10: float  # 10th percentile of the devices' accuracies (unweighted, nearest rank)

    def as_metrics(self, prefix: str = "fed_") -> dict[str, float]:
        """Flat float metrics for the round's row, RoundStatus.last_metrics, the dashboard and Prometheus."""
        return {
            f"{prefix}accuracy": self.accuracy, f"{prefix}loss": self.loss, f"{prefix}devices": float(self.devices),
            f"{prefix}samples": float(self.samples), f"{prefix}accuracy_min": self.accuracy_min,
            f"{prefix}accuracy_p10": self.accuracy_p10, f"{prefix}version": float(self.model_version),
        }


def reduce_reports(reports: Iterable[EvalReport], *, max_samples: int | None = None) -> FederatedMetrics | None:
    """The federated metrics of one version's reports (None without any); ``max_samples`` caps a device's weight."""
    kept = list(reports)
    if not kept:
        return None
    versions = {r.model_version for r in kept}
    if len(versions) != 1:
        raise ValueError(f"reports of several versions {sorted(versions)} cannot be reduced together")
    weights = [min(r.num_samples, max_samples) if max_samples else r.num_samples for r in kept]
    total = sum(weights)
    accuracies = sorted(r.accuracy for r in kept)
    return FederatedMetrics(
        model_version=versions.pop(),
        devices=len(kept),
        samples=total,
        loss=math.fsum(w * r.loss for w, r in zip(weights, kept, strict=True)) / total,
        accuracy=math.fsum(w * r.accuracy for w, r in zip(weights, kept, strict=True)) / total,
        accuracy_min=accuracies[0],
        accuracy_p10=accuracies[max(0, math.ceil(0.1 * len(accuracies)) - 1)],
    )


def eval_due(model_version: int, every: int, *, final: bool = False) -> bool:
    """Whether the announcement of ``model_version`` asks for evaluations (``every`` 0: never)."""
    if every < 0:
        raise ValueError(f"eval every must be >= 0, got {every}")
    return every > 0 and (final or model_version % every == 0)


@dataclass
class EvalCollector:
    """The reports of one announced version (a new collector per announced version)."""

    fleet: str
    model_version: int
    request: Participation  # the announcement's cohort field: whom it asked
    max_samples: int | None = None
    reports: dict[str, EvalReport] = field(default_factory=dict)

    def offer(self, client: str, payload: bytes) -> str | None:
        """Keep one report from ``client``'s topic; None if kept, else why it was refused."""
        try:
            report = EvalReport.from_bytes(payload, fleet=self.fleet)
        except DecodeError as exc:
            return str(exc)
        if report.client_id != client:
            return f"client_mismatch: report of {report.client_id!r} on the topic of {client!r}"
        if report.model_version != self.model_version:
            return f"stale: report on v{report.model_version}, evaluations are collected for v{self.model_version}"
        if not self.request.asks_eval(client, fleet=self.fleet, model_version=self.model_version):
            return f"not_invited: {client} was not asked to evaluate v{self.model_version}"
        if client in self.reports:
            return f"duplicate: {client} already reported on v{self.model_version}"
        self.reports[client] = report
        return None

    def metrics(self) -> FederatedMetrics | None:
        return reduce_reports(self.reports.values(), max_samples=self.max_samples)
