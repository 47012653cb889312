"""Server-side aggregation strategies behind one small interface.

The round loop folds accepted deltas into a WeightedSum; a strategy turns the mean delta (the
pseudo-gradient of Reddi et al. 2021) into the next global model. Every strategy here needs only
that mean, so memory stays O(model) however many clients report. Strategy state (server momentum,
Adam's m and v) is saved in each checkpoint so a restarted aggregator does not reset it.

FedProx is not a server strategy: it is the agents' proximal term, set with the task's ``mu``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from aggregator.strategies.fedavg import FedAvg
from aggregator.strategies.fedavgm import FedAvgM
from aggregator.strategies.fedopt import FedAdagrad, FedAdam, FedYogi


class Strategy(Protocol):
    name: str

    def apply(self, weights: Mapping[str, np.ndarray], mean_delta: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The next global weights."""
        ...

    def state(self) -> dict[str, np.ndarray]:
        """Arrays to persist with the checkpoint."""
        ...

    def load_state(self, state: Mapping[str, np.ndarray]) -> None: ...


@dataclass(frozen=True)
class StrategyConfig:
    """Server optimiser hyper-parameters; each strategy reads the ones it uses."""

    server_lr: float | None = None  # None: the strategy's default (1.0 for FedAvg/FedAvgM, 0.01 adaptive)
    momentum: float = 0.9  # FedAvgM
    beta1: float = 0.9  # FedAdam/FedYogi/FedAdagrad first moment
    beta2: float = 0.99  # FedAdam/FedYogi second moment
    tau: float = 1e-3  # adaptivity: added to sqrt(v), and v starts at tau**2

    def __post_init__(self) -> None:
        if self.server_lr is not None and not (self.server_lr > 0 and math.isfinite(self.server_lr)):
            raise ValueError(f"server_lr must be positive, got {self.server_lr}")
        for name in ("momentum", "beta1", "beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if not (self.tau > 0 and math.isfinite(self.tau)):
            raise ValueError(f"tau must be positive, got {self.tau}")


STRATEGIES: dict[str, type[FedAvg | FedAvgM | FedAdam | FedYogi | FedAdagrad]] = {s.name: s for s in (FedAvg, FedAvgM, FedAdam, FedYogi, FedAdagrad)}


def make_strategy(name: str, config: StrategyConfig | None = None) -> Strategy:
    if name not in STRATEGIES:
        hint = " (FedProx is agent-side: use strategy fedavg with --mu)" if name == "fedprox" else ""
        raise ValueError(f"unknown strategy {name!r}{hint} (known: {', '.join(STRATEGIES)})")
    return STRATEGIES[name].from_config(config or StrategyConfig())


__all__ = ["STRATEGIES", "FedAdagrad", "FedAdam", "FedAvg", "FedAvgM", "FedYogi", "Strategy", "StrategyConfig", "make_strategy"]
