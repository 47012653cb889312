"""Client-level differential privacy at the aggregator (DP-FedAvg, McMahan et al. 2018).

Each round: every accepted delta is clipped to L2 norm ``C`` (``NormBound`` with a fixed bound,
action clip), deltas are summed with equal weight (a sample-count weight would let one device's
influence exceed ``C``), Gaussian noise of standard deviation ``z * C`` is added to the sum and
the sum is divided by the round's target (the "fixed denominator" estimator: dividing by the
number actually received would make the denominator itself depend on who took part).

One round is one step of the sampled Gaussian mechanism with noise multiplier ``z`` and sampling
rate ``q = target / population``. The privacy loss over the rounds is tracked with the Rényi DP
accountant (Mironov 2017; Mironov, Talwar, Zhang 2019) as implemented by Opacus, converted to
(epsilon, delta) with Balle et al. 2020's bound. ``q`` assumes each round's participants are a
uniform sample of a population of ``population`` devices; with no population given q = 1 (no
amplification by sampling), which over-states epsilon rather than under-states it.

What this protects: any single device's participation, against whoever sees the published
models. What it does not: the aggregator itself sees the clipped deltas in clear.
"""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from aggregator.aggregation.clipping import l2_norm
from aggregator.aggregation.fold import WeightedSum
from fedge_contract.tensors import ModelSpec


@dataclass(frozen=True)
class PrivacyParams:
    noise_multiplier: float  # z: noise std = z * clip_norm
    clip_norm: float  # C: each delta's L2 norm bound
    sample_rate: float = 1.0  # q = target / population
    delta: float = 1e-5

    def __post_init__(self) -> None:
        if not (self.noise_multiplier > 0 and math.isfinite(self.noise_multiplier)):
            raise ValueError(f"dp noise multiplier must be positive, got {self.noise_multiplier}")
        if not (self.clip_norm > 0 and math.isfinite(self.clip_norm)):
            raise ValueError("differential privacy needs a fixed positive --clip-norm")
        if not 0 < self.sample_rate <= 1:
            raise ValueError(f"dp sample rate must be in (0, 1], got {self.sample_rate}")
        if not 0 < self.delta < 1:
            raise ValueError(f"dp delta must be in (0, 1), got {self.delta}")
        if importlib.util.find_spec("opacus") is None:  # refuse at start-up, not at the end of the first round
            raise ValueError("differential privacy needs Opacus' accountant: pip install 'fedge[dp]' (or opacus)")

    def epsilon(self, rounds: int) -> float:
        """(epsilon, delta)-DP epsilon after ``rounds`` noisy rounds (0 rounds: 0)."""
        if rounds <= 0:
            return 0.0
        # Opacus' accountant maths (numpy/scipy only); imported here so only a DP run pays for it.
        from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent
        from opacus.accountants.rdp import RDPAccountant

        orders = RDPAccountant.DEFAULT_ALPHAS
        rdp = compute_rdp(q=self.sample_rate, noise_multiplier=self.noise_multiplier, steps=rounds, orders=orders)
        eps, _ = get_privacy_spent(orders=orders, rdp=rdp, delta=self.delta)
        return float(eps)


class NoisySum:
    """Equal-weight sum of clipped deltas; ``mean()`` adds the Gaussian noise and divides by the target.

    Same interface as ``WeightedSum``. ``rng`` defaults to OS entropy: noise an observer could
    predict protects nothing; tests pass a seeded generator.
    """

    def __init__(self, spec: ModelSpec, params: PrivacyParams, denominator: int, rng: np.random.Generator | None = None) -> None:
        if denominator < 1:
            raise ValueError("denominator must be >= 1")
        self.params = params
        self.denominator = denominator
        self._sum = WeightedSum(spec)
        self._rng = rng or np.random.default_rng()
        self.total_weight = 0.0

    @property
    def count(self) -> int:
        return self._sum.count

    def add(self, delta: Mapping[str, np.ndarray], weight: float) -> None:
        norm = l2_norm(delta)
        if norm > self.params.clip_norm:  # the sensitivity bound must hold whatever came before
            delta = {k: v * np.float32(self.params.clip_norm / norm) for k, v in delta.items()}
        self._sum.add(delta, 1.0)
        self.total_weight += weight

    def merge(self, other: NoisySum) -> None:
        """Add another worker's clipped sum (noise is drawn once, in ``mean``, by whoever merges)."""
        self._sum.merge(other._sum)
        self.total_weight += other.total_weight

    def to_wire(self) -> dict[str, Any]:
        return {"sum": self._sum.to_wire(), "total_weight": self.total_weight}

    def merge_wire(self, wire: Mapping[str, Any]) -> None:
        self._sum.merge_wire(wire["sum"])
        self.total_weight += float(wire["total_weight"])

    def mean(self) -> dict[str, np.ndarray]:
        std = self.params.noise_multiplier * self.params.clip_norm
        scale = self._sum.count / self.denominator  # WeightedSum.mean() divides by the count
        return {
            name: (value.astype(np.float64) * scale + self._rng.normal(0.0, std, size=value.shape) / self.denominator).astype(np.float32)
            for name, value in self._sum.mean().items()
        }


# Rounds whose participants come from cohort selection (aggregator/rounds/cohort.py): two figures,
# because the cohort is announced in the clear (fedge_contract/cohort.py).
#
# - ``epsilon_over_rounds``: against an observer who sees the published models but not the
#   announcements' cohorts. Each round is one sampled Gaussian mechanism with *that round's*
#   sampling rate ``q_t`` (``Selection.sampling_rate``, an upper bound on any device's probability
#   of being invited, which is what amplification by sampling needs); RDP adds up over rounds.
#   Opacus' accountant assumes Poisson sampling; a cohort of fixed size is drawn without
#   replacement, for which the same q is the usual approximation (as DP-FedAvg's accounting is).
# - ``epsilon_announced``: against an observer of the announcements, who knows who was invited.
#   Sampling then hides nothing: a device's loss is the Gaussian mechanism (q = 1) composed over
#   the rounds it was invited to, at most ``CohortSelector.max_invitations()``.


def epsilon_over_rounds(rates: Iterable[float], noise_multiplier: float, delta: float) -> float:
    """(epsilon, delta)-DP epsilon after one noisy round per entry of ``rates`` (each that round's q)."""
    from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent
    from opacus.accountants.rdp import RDPAccountant

    orders = RDPAccountant.DEFAULT_ALPHAS
    total = None
    for q in rates:
        if not 0 < q <= 1:
            raise ValueError(f"a sampling rate must be in (0, 1], got {q}")
        step = compute_rdp(q=q, noise_multiplier=noise_multiplier, steps=1, orders=orders)
        total = step if total is None else total + step
    if total is None:
        return 0.0
    eps, _ = get_privacy_spent(orders=orders, rdp=total, delta=delta)
    return float(eps)


def epsilon_announced(invitations: int, noise_multiplier: float, delta: float) -> float:
    """Epsilon of a device invited to ``invitations`` rounds, against an observer of the cohorts (q = 1 each)."""
    return epsilon_over_rounds([1.0] * invitations, noise_multiplier, delta)
