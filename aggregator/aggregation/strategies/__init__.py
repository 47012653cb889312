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
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from aggregator.aggregation.strategies.fedavg import FedAvg
from aggregator.aggregation.strategies.fedavgm import FedAvgM
from aggregator.aggregation.strategies.fedopt import FedAdagrad, FedAdam, FedYogi


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
    """The server optimiser and its hyper-parameters; each strategy reads the ones it uses.

    The metadata are the aggregator's flags (aggregator/config.py: the ``[strategy]`` settings).
    """

    name: str = field(default="fedavg", metadata={"flag": "--strategy", "help": "server aggregation strategy"})
    server_lr: float | None = field(default=None, metadata={  # None: the strategy's default
        "help": "server learning rate (default 1.0 fedavg/fedavgm, 0.01 adaptive)"})
    momentum: float = field(default=0.9, metadata={"flag": "--server-momentum", "help": "FedAvgM momentum"})
    beta1: float = field(default=0.9, metadata={"help": "FedAdam/FedYogi/FedAdagrad first-moment decay"})
    beta2: float = field(default=0.99, metadata={"help": "FedAdam/FedYogi second-moment decay"})
    tau: float = field(default=1e-3, metadata={"help": "adaptivity of the adaptive optimisers (added to sqrt(v); v starts at tau**2)"})

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
    """The strategy ``name``, with the hyper-parameters of ``config`` (whose own ``name`` is not read)."""
    if name not in STRATEGIES:
        hint = " (FedProx is agent-side: use strategy fedavg with --mu)" if name == "fedprox" else ""
        raise ValueError(f"unknown strategy {name!r}{hint} (known: {', '.join(STRATEGIES)})")
    return STRATEGIES[name].from_config(config or StrategyConfig())


__all__ = ["STRATEGIES", "FedAdagrad", "FedAdam", "FedAvg", "FedAvgM", "FedYogi", "Strategy", "StrategyConfig", "make_strategy"]
