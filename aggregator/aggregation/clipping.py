"""Update norm bounding and sample-count capping.

A device can claim anything: a delta a thousand times too large, or a million samples to make
its delta weigh more than the rest of the fleet together. Two cheap, O(model) defences:

- ``NormBound``: the L2 norm of each delta is compared with a bound, either fixed
  (``clip_norm``) or adaptive (``factor`` x the median norm of the last ``window`` updates that
  were accepted, once ``warmup`` norms are known; Sun et al. 2019, "Can you really backdoor FL?").
  Beyond the bound the delta is scaled back onto it (``clip``) or refused (``reject``, a receipt
  with reason ``norm_bound``). The median of recent norms follows the honest majority as the
  model converges and deltas shrink; an attacker below 50% of the traffic cannot move it far.
- ``capped_weight``: a delta's weight is min(num_samples, cap): honest large devices lose a
  little weight, a liar gains at most ``cap``.
"""

from __future__ import annotations

import collections
import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from aggregator.errors import Rejection
from fedge_contract import ReceiptStatus

CLIP_ACTIONS = ("clip", "reject")


def l2_norm(delta: Mapping[str, np.ndarray]) -> float:
    """The L2 norm over all tensors of a delta (float64 accumulation)."""
    return math.sqrt(sum(float(np.dot(v.ravel().astype(np.float64), v.ravel().astype(np.float64))) for v in delta.values()))


def capped_weight(num_samples: int, cap: int | None) -> float:
    return float(num_samples if cap is None else min(num_samples, cap))


@dataclass
class NormBound:
    """Clips or rejects deltas whose L2 norm exceeds a fixed or adaptive bound."""

    clip_norm: float | None = None  # fixed bound; with ``factor`` it is the bound used during warm-up
    factor: float | None = None  # adaptive: bound = factor * median of recent accepted norms
    action: str = "clip"  # clip | reject
    window: int = 100
    warmup: int = 5

    def __post_init__(self) -> None:
        if self.clip_norm is not None and not (self.clip_norm > 0 and math.isfinite(self.clip_norm)):
            raise ValueError(f"clip norm must be positive, got {self.clip_norm}")
        if self.factor is not None and not (self.factor >= 1 and math.isfinite(self.factor)):
            raise ValueError(f"adaptive clip factor must be >= 1, got {self.factor}")
        if self.action not in CLIP_ACTIONS:
            raise ValueError(f"clip action must be one of {', '.join(CLIP_ACTIONS)}, got {self.action!r}")
        self._recent: collections.deque[float] = collections.deque(maxlen=self.window)
        self.clipped = 0  # deltas scaled back onto the bound since the last round_stats()
        self.norms: list[float] = []  # norms of this round's accepted deltas

    @property
    def active(self) -> bool:
        return self.clip_norm is not None or self.factor is not None

    def bound(self) -> float | None:
        """The bound in force now (None: nothing known yet, no bound)."""
        if self.factor is not None and len(self._recent) >= self.warmup:
            return self.factor * float(np.median(self._recent))
        return self.clip_norm

    def apply(self, delta: dict[str, np.ndarray], *, strict: bool = True) -> dict[str, np.ndarray]:
        """The delta within the bound; a Rejection when over it in reject mode (unless not ``strict``)."""
        delta, norm, clipped = self.assess(delta, strict=strict)
        self.record(norm, clipped)
        return delta

    def assess(self, delta: dict[str, np.ndarray], *, strict: bool = True) -> tuple[dict[str, np.ndarray], float, bool]:
        """``apply`` without remembering the norm: (bounded delta, its norm, clipped?), for an
        update that may still be refused (``record`` it once accepted)."""
        norm = l2_norm(delta)
        limit = self.bound()
        if limit is not None and norm > limit:
            if self.action == "reject" and strict:
                raise Rejection(ReceiptStatus.REJECTED, f"norm_bound: update norm {norm:.4g} exceeds the bound {limit:.4g}")
            scale = np.float32(limit / norm)
            return {k: v * scale for k, v in delta.items()}, norm, True
        return delta, norm, False

    def record(self, norm: float, clipped: bool) -> None:
        self.clipped += clipped
        self._recent.append(norm)
        self.norms.append(norm)

    def absorb(self, norms: list[float], clipped: int) -> None:
        """Count another process's accepted norms into this round's figures (ingest workers' partials)."""
        self._recent.extend(norms)
        self.norms.extend(norms)
        self.clipped += clipped

    def round_stats(self) -> dict[str, float]:
        """Per-round figures for the round's metrics, then reset for the next round."""
        stats: dict[str, float] = {"clipped": float(self.clipped)}
        if self.norms:
            stats["update_norm_median"] = float(np.median(self.norms))
        limit = self.bound()
        if limit is not None:
            stats["clip_bound"] = limit
        self.clipped, self.norms = 0, []
        return stats
