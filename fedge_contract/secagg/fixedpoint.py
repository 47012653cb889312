"""A delta as fixed-point integers in the ring, such that the sum of a whole cohort cannot wrap.

Each coordinate is clipped to [-clip, clip], multiplied by ``scale = limit / clip`` and rounded
stochastically (up with probability equal to the fraction, so the rounding is unbiased) to an
integer in [-limit, limit], where ``limit = floor((2^(bits-1) - 1) / summands)``. The sum of up to
``summands`` such integers lies in [-(2^(bits-1) - 1), 2^(bits-1) - 1], so reading the ring sum
back as a signed number (``Ring.to_signed``) gives the exact integer sum: no wrap-around, however the
devices' values fall. The price is resolution: ``step = clip / limit``.

With the default 32 bits, 100 summands and clip 8 (Flower's default clipping range), limit is
21,474,836 and the step 3.7e-7; stochastic rounding adds independent zero-mean noise of standard
deviation <= step / 2 to each device's coordinate, so <= 1.9e-7 / sqrt(n) to a mean of n devices.
That is below float32's resolution at 1.0 (1.2e-7 * 0.5) and far below the noise of SGD. The real
cost is the clip: coordinates beyond it are cut (DESIGN.md measures both on the digits task).

``Weighting`` gives FedAvg's sample-weighted mean through a sum: a device sends
``[r * clip, r * delta]`` with ``r = min(num_samples, max_weight) / max_weight``, and the server divides
the sum of the rest by the sum of the first coordinate (Flower's SecAgg+ workflow does the same).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fedge_contract.secagg.errors import ParameterError
from fedge_contract.secagg.ring import Ring

MAX_LIMIT = 1 << 52


@dataclass(frozen=True)
class FixedPoint:
    ring: Ring
    clip: float
    summands: int  # the most vectors ever summed: the round's cohort size

    def __post_init__(self) -> None:
        if not (np.isfinite(self.clip) and self.clip > 0):
            raise ParameterError(f"the clipping range must be finite and > 0, got {self.clip}")
        if self.summands < 1:
            raise ParameterError(f"summands must be >= 1, got {self.summands}")
        if self.limit < 1:
            raise ParameterError(f"{self.ring.bits} bits leave no room for {self.summands} summands: use more bits")

    @property
    def limit(self) -> int:
        """The largest magnitude of one device's integer (at most 2^52: float64 holds no finer fraction to round)."""
        return min(((1 << (self.ring.bits - 1)) - 1) // self.summands, MAX_LIMIT)

    @property
    def scale(self) -> float:
        return self.limit / self.clip

    @property
    def step(self) -> float:
        """The quantisation step: one integer unit in the delta's units."""
        return self.clip / self.limit

    def encode(self, values: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Clip, scale and stochastically round ``values`` (1-D, finite) into ring elements."""
        if values.ndim != 1:
            raise ParameterError(f"fixed-point encodes flat vectors, got shape {values.shape}")
        scaled = np.clip(values.astype(np.float64), -self.clip, self.clip) * self.scale
        if not np.all(np.isfinite(scaled)):
            raise ParameterError("the vector to encode has non-finite values")
        floor = np.floor(scaled)
        rounded = floor + (rng.random(scaled.shape) < (scaled - floor))
        integers = np.clip(rounded, -self.limit, self.limit).astype(np.int64)  # scaled may overshoot limit by an ulp
        return self.ring.from_signed(integers)

    def decode_sum(self, total: np.ndarray, count: int) -> np.ndarray:
        """The float64 sum of ``count`` encoded vectors, from the sum of their ring elements."""
        if not 0 <= count <= self.summands:
            raise ParameterError(f"a sum of {count} vectors, where this encoding allows at most {self.summands}")
        return self.ring.to_signed(total).astype(np.float64) / self.scale


@dataclass(frozen=True)
class Weighting:
    """FedAvg's weighted mean through an unweighted sum (see the module docstring)."""

    clip: float
    max_weight: int

    def __post_init__(self) -> None:
        if self.max_weight < 1:
            raise ParameterError(f"max_weight must be >= 1, got {self.max_weight}")

    def vector(self, delta: np.ndarray, num_samples: int) -> np.ndarray:
        """``[r * clip, r * clip(delta)]``: length len(delta) + 1, ready for ``FixedPoint.encode``."""
        if num_samples < 1:
            raise ParameterError(f"num_samples must be >= 1, got {num_samples}")
        ratio = min(num_samples, self.max_weight) / self.max_weight
        clipped = np.clip(delta.astype(np.float64).ravel(), -self.clip, self.clip)
        return np.concatenate([[ratio * self.clip], ratio * clipped])

    def mean(self, total: np.ndarray) -> tuple[np.ndarray, float]:
        """(the weighted mean delta, the total weight in samples) from a decoded sum of ``vector``s."""
        weight = float(total[0]) / self.clip
        if weight <= 0:
            raise ParameterError("the sum carries no weight: was it a sum of Weighting vectors?")
        return total[1:] / weight, weight * self.max_weight
