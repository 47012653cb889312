"""What the round loop does with a validated delta, as the fleet's config chose.

One object so the ingest needs three calls: ``assess`` then ``record`` (norm bound and weight
cap, or a Rejection), ``collector`` (a fresh WeightedSum, robust Stacked or DP NoisySum for each round) and
``metrics`` (clipping figures and the privacy budget spent, stored with the round and published
in RoundStatus.last_metrics).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from aggregator.aggregation.clipping import NormBound, capped_weight
from aggregator.aggregation.fold import WeightedSum
from aggregator.aggregation.privacy import NoisySum, PrivacyParams, epsilon_announced, epsilon_over_rounds
from aggregator.aggregation.robust import Stacked
from fedge_contract.tensors import ModelSpec

if TYPE_CHECKING:
    from collections.abc import Mapping

    from aggregator.config import AggregatorConfig
    from aggregator.rounds.policy import Sampling


class Collector(Protocol):
    total_weight: float

    @property
    def count(self) -> int: ...

    def add(self, delta: Mapping[str, np.ndarray], weight: float) -> None: ...

    def mean(self) -> dict[str, np.ndarray]: ...


class Mergeable(Collector, Protocol):
    """A collector whose partial sums add up (WeightedSum, NoisySum): what ingest workers fold."""

    def to_wire(self) -> dict[str, Any]: ...

    def merge_wire(self, wire: Mapping[str, Any]) -> None: ...


@dataclass(frozen=True)
class Checked:
    """A delta that passed the defences, with what they measured."""

    delta: dict[str, np.ndarray]
    weight: float
    norm: float | None = None  # None: no norm bound configured
    clipped: bool = False


class Defence:
    def __init__(self, config: AggregatorConfig) -> None:
        self.config = config
        self.settings = config.defence
        self.norm_bound = NormBound(clip_norm=self.settings.bound, factor=self.settings.factor, action=self.settings.clip_action)
        self.privacy = config.privacy
        self._rng = np.random.default_rng(self.settings.dp_seed)
        # rows a robust rule may have to hold: a round closes at its target (async: its buffer size)
        self.capacity = config.rounds.per_round

    def assess(self, delta: dict[str, np.ndarray], num_samples: int, *, strict: bool = True) -> Checked:
        """The bounded delta and its weight (a Rejection when over the bound in reject mode). ``record``
        it once the update is accepted, so a refused one does not move the adaptive bound or the
        round's clipping figures."""
        weight = capped_weight(num_samples, self.settings.max_weight)
        if not self.norm_bound.active:
            return Checked(delta, weight)
        bounded, norm, clipped = self.norm_bound.assess(delta, strict=strict)
        return Checked(bounded, weight, norm, clipped)

    def record(self, checked: Checked) -> None:
        if checked.norm is not None:
            self.norm_bound.record(checked.norm, checked.clipped)

    def take_norms(self) -> tuple[list[float], int]:
        """This process's norms and clip count since the last call (an ingest worker's share of the round's figures)."""
        norms, clipped = self.norm_bound.norms, self.norm_bound.clipped
        self.norm_bound.norms, self.norm_bound.clipped = [], 0
        return norms, clipped

    def absorb(self, norms: list[float], clipped: int) -> None:
        """Count a worker's ``take_norms`` into this round's figures."""
        self.norm_bound.absorb(norms, clipped)

    def collector(self, spec: ModelSpec) -> Collector:
        if self.privacy is not None:
            return NoisySum(spec, self.privacy, denominator=self.capacity, rng=self._rng)
        if self.settings.aggregation == "mean":
            return WeightedSum(spec)
        return Stacked(spec, self.capacity, self.settings.aggregation, self.settings.robust_fraction)

    def metrics(self, version: int, sampling: Sampling | None = None) -> dict[str, float]:
        """Figures for the round that produced ``version`` (epsilon: after ``version`` noisy rounds).

        With ``sampling`` (a cohort per round), epsilon composes each round's own sampling rate
        (rounds without one, from before cohorts, use the configured rate), and
        ``dp_epsilon_announced`` is the figure against an observer of the announced cohorts."""
        stats = self.norm_bound.round_stats() if self.norm_bound.active else {}
        if self.privacy is not None:
            if sampling is not None and sampling.rates:
                rates = [sampling.rates.get(r, self.privacy.sample_rate) for r in range(1, version + 1)]
                # a round that invited nobody used nobody's data: it adds nothing
                stats["dp_epsilon"] = epsilon_over_rounds([q for q in rates if q > 0], self.privacy.noise_multiplier, self.privacy.delta)
                stats["dp_sampling_rate"] = rates[-1] if rates else self.privacy.sample_rate
                stats["dp_epsilon_announced"] = epsilon_announced(sampling.most_invitations, self.privacy.noise_multiplier,
                                                                  self.privacy.delta)
            else:
                stats["dp_epsilon"] = self.privacy.epsilon(version)
            stats["dp_delta"] = self.privacy.delta
        return stats


__all__ = ["Checked", "Collector", "Defence", "Mergeable", "PrivacyParams"]
