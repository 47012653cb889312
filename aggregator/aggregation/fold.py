"""The streaming weighted sum at the heart of FedAvg.

Updates are folded in as they arrive, so memory is O(model size) however many clients report.
The sum is kept in float64: the result then does not depend, at float32 precision, on the order
in which updates happened to arrive, which keeps runs with the same seed reproducible. numpy
folds on one thread (torch's default thread pool spins on 2 cores for ~8 ms per call).

The fold is associative: ingest workers (aggregator/workers/) each fold a partial sum, which
cross the pipe as raw float64 bytes (``to_wire``) and are ``merge``d by the coordinator.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from fedge_contract.tensors import ModelSpec


def scaled(delta: Mapping[str, np.ndarray], factor: float) -> dict[str, np.ndarray]:
    """``delta * factor`` in float32 (one temporary model copy: memory stays O(model)); FedBuff's staleness discount."""
    return {k: v * np.float32(factor) for k, v in delta.items()}


class WeightedSum:
    def __init__(self, spec: ModelSpec) -> None:
        self._sum = {t.name: np.zeros(t.shape, dtype=np.float64) for t in spec.tensors}
        self.total_weight = 0.0
        self.count = 0

    def add(self, delta: Mapping[str, np.ndarray], weight: float) -> None:
        if not (weight > 0 and math.isfinite(weight)):
            raise ValueError(f"weight must be positive and finite, got {weight}")
        for name, acc in self._sum.items():
            # the float32 product's rounding depends only on this update, not on arrival order
            acc += delta[name] * np.float32(weight)
        self.total_weight += weight
        self.count += 1

    def merge(self, other: WeightedSum) -> None:
        """Add another partial sum of the same model into this one (as if its updates were folded here)."""
        if {n: a.shape for n, a in other._sum.items()} != {n: a.shape for n, a in self._sum.items()}:
            raise ValueError("cannot merge partial sums of different models")
        for name, acc in self._sum.items():
            acc += other._sum[name]
        self.total_weight += other.total_weight
        self.count += other.count

    def to_wire(self) -> dict[str, Any]:
        """The partial sum as plain values (float64 bytes per tensor): what an ingest worker sends."""
        return {"sums": {name: acc.tobytes() for name, acc in self._sum.items()}, "total_weight": self.total_weight, "count": self.count}

    def merge_wire(self, wire: Mapping[str, Any]) -> None:
        """``merge`` a partial sum received as ``to_wire`` values; refuses one of another model."""
        sums = wire["sums"]
        if set(sums) != set(self._sum) or any(len(sums[n]) != acc.nbytes for n, acc in self._sum.items()):
            raise ValueError("cannot merge partial sums of different models")
        for name, acc in self._sum.items():
            acc += np.frombuffer(sums[name], dtype=np.float64).reshape(acc.shape)
        self.total_weight += float(wire["total_weight"])
        self.count += int(wire["count"])

    def mean(self) -> dict[str, np.ndarray]:
        """The weighted mean delta (float32); requires at least one update."""
        if self.count == 0:
            raise ValueError("no updates folded")
        return {name: (acc / self.total_weight).astype(np.float32) for name, acc in self._sum.items()}
