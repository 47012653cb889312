"""Byzantine-robust aggregation: coordinate-wise median, trimmed mean, multi-Krum.

A weighted mean lets one device move the model anywhere (one update scaled by 1000 outweighs
the fleet). The rules here bound what a minority of updates can do, at a price: they need every
update of the round at once, not a running sum. ``Stacked`` keeps them in one preallocated
(capacity x parameters) float32 matrix, capacity = the round's target (sync) or buffer size
(async), so memory is O(target x model), fixed before the first update arrives.

- median (Yin et al. 2018): per coordinate, the median of the n values. Unweighted.
- trimmed mean (Yin et al. 2018): per coordinate, drop the k = floor(fraction * n) largest and k
  smallest values, average the rest. Unweighted.
- multi-Krum (Blanchard et al. 2017; El Mhamdi et al. 2018): with f = floor(fraction * n) assumed
  Byzantine, score each update by the sum of squared distances to its n - f - 2 nearest others,
  keep the n - f best scored and average them weighted by num_samples (capped by validation).

``fraction`` is the share of updates per round assumed malicious. All rules fall back to fewer
trimmed values when a round closes with few updates (at its deadline), and never to nothing.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

from fedge_contract.tensors import ModelSpec

AGGREGATIONS = ("mean", "median", "trimmed_mean", "krum")


def coordinate_median(rows: np.ndarray) -> np.ndarray:
    """(n, p) -> (p,): the per-coordinate median."""
    return np.median(rows, axis=0).astype(np.float32)


def trimmed_mean(rows: np.ndarray, fraction: float) -> np.ndarray:
    """(n, p) -> (p,): per coordinate, the mean without the k largest and k smallest values."""
    n = rows.shape[0]
    k = min(math.floor(fraction * n), (n - 1) // 2)  # always keep at least one value
    if k == 0:
        return rows.mean(axis=0, dtype=np.float64).astype(np.float32)
    ordered = np.sort(rows, axis=0)  # one (n, p) temporary: still O(target x model)
    return ordered[k : n - k].mean(axis=0, dtype=np.float64).astype(np.float32)


def krum_scores(rows: np.ndarray, f: int) -> np.ndarray:
    """Each row's Krum score: the sum of squared distances to its n - f - 2 nearest other rows."""
    n = rows.shape[0]
    x = rows.astype(np.float64)
    sq = np.einsum("ij,ij->i", x, x)
    dist = np.maximum(sq[:, None] + sq[None, :] - 2.0 * (x @ x.T), 0.0)  # (n, n) pairwise squared distances
    np.fill_diagonal(dist, np.inf)
    neighbours = max(n - f - 2, 1)
    return np.sort(dist, axis=1)[:, :neighbours].sum(axis=1)


def multi_krum(rows: np.ndarray, weights: np.ndarray, fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """(n, p) -> ((p,), selected row indices): the weighted mean of the n - f best Krum-scored rows."""
    n = rows.shape[0]
    if n <= 2:
        chosen = np.arange(n)
    else:
        f = min(math.floor(fraction * n), (n - 3) // 2)  # Krum needs n > 2f + 2
        chosen = np.sort(np.argsort(krum_scores(rows, f), kind="stable")[: n - f])
    w = weights[chosen].astype(np.float64)
    mean = (w[:, None] * rows[chosen]).sum(axis=0) / w.sum()
    return mean.astype(np.float32), chosen


class Stacked:
    """Collects a round's deltas as rows of a fixed matrix, then applies a robust rule.

    Same interface as ``WeightedSum`` (``add``, ``mean``, ``total_weight``, ``count``), so the
    round loop does not know which one it holds.
    """

    def __init__(self, spec: ModelSpec, capacity: int, rule: str, fraction: float = 0.2) -> None:
        if rule not in AGGREGATIONS[1:]:
            raise ValueError(f"unknown robust rule {rule!r} (known: {', '.join(AGGREGATIONS[1:])})")
        if capacity < 1:
            raise ValueError("capacity must be >= 1")
        self.rule = rule
        self.fraction = fraction
        self._spec = spec
        self._rows = np.zeros((capacity, spec.num_parameters), dtype=np.float32)
        self._weights = np.zeros(capacity, dtype=np.float64)
        self.total_weight = 0.0
        self.count = 0
        self.selected: np.ndarray | None = None  # multi-Krum: rows kept by the last mean()

    def add(self, delta: Mapping[str, np.ndarray], weight: float) -> None:
        if not (weight > 0 and math.isfinite(weight)):
            raise ValueError(f"weight must be positive and finite, got {weight}")
        if self.count == len(self._rows):
            raise ValueError(f"round already holds its capacity of {len(self._rows)} updates")
        row, offset = self._rows[self.count], 0
        for t in self._spec.tensors:
            size = math.prod(t.shape)
            row[offset : offset + size] = np.asarray(delta[t.name], dtype=np.float32).reshape(-1)
            offset += size
        self._weights[self.count] = weight
        self.total_weight += weight
        self.count += 1

    def mean(self) -> dict[str, np.ndarray]:
        """The robust aggregate delta, shaped like the model; requires at least one update."""
        if self.count == 0:
            raise ValueError("no updates folded")
        rows = self._rows[: self.count]
        if self.rule == "median":
            flat = coordinate_median(rows)
        elif self.rule == "trimmed_mean":
            flat = trimmed_mean(rows, self.fraction)
        else:
            flat, self.selected = multi_krum(rows, self._weights[: self.count], self.fraction)
        out, offset = {}, 0
        for t in self._spec.tensors:
            size = math.prod(t.shape)
            out[t.name] = flat[offset : offset + size].reshape(t.shape).copy()
            offset += size
        return out
