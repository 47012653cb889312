"""FedAvgM (Hsu et al. 2019): FedAvg with server momentum on the pseudo-gradient.

    v_t = momentum * v_{t-1} + mean_delta_t        (v_0 = 0)
    w_{t+1} = w_t + server_lr * v_t

This is SGD with heavy-ball momentum on -mean_delta, as in Reddi et al. (2021). The momentum
buffer is the strategy state, checkpointed under ``fedavgm.v.<tensor>``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from aggregator.strategies import StrategyConfig

_PREFIX = "fedavgm.v."


class FedAvgM:
    name = "fedavgm"

    def __init__(self, server_lr: float = 1.0, momentum: float = 0.9) -> None:
        self.server_lr = server_lr
        self.momentum = momentum
        self._velocity: dict[str, np.ndarray] = {}

    @classmethod
    def from_config(cls, config: StrategyConfig) -> FedAvgM:
        return cls(server_lr=config.server_lr or 1.0, momentum=config.momentum)

    def apply(self, weights: Mapping[str, np.ndarray], mean_delta: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        new = {}
        for name, w in weights.items():
            previous = self._velocity.get(name, 0.0)
            velocity = (self.momentum * np.asarray(previous, np.float64) + mean_delta[name]).astype(np.float32)
            self._velocity[name] = velocity
            new[name] = (w + self.server_lr * velocity.astype(np.float64)).astype(np.float32)
        return new

    def state(self) -> dict[str, np.ndarray]:
        return {_PREFIX + name: v for name, v in self._velocity.items()}

    def load_state(self, state: Mapping[str, np.ndarray]) -> None:
        """Take this strategy's arrays; another strategy's state (a switched --strategy) is ignored."""
        self._velocity = {k[len(_PREFIX):]: np.asarray(v, np.float32) for k, v in state.items() if k.startswith(_PREFIX)}
