"""FedAvg (McMahan et al. 2017): the next model is the global plus the sample-weighted mean delta."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from aggregator.strategies import StrategyConfig


class FedAvg:
    name = "fedavg"

    def __init__(self, server_lr: float = 1.0) -> None:
        self.server_lr = server_lr

    @classmethod
    def from_config(cls, config: StrategyConfig) -> FedAvg:
        return cls(server_lr=config.server_lr or 1.0)

    def apply(self, weights: Mapping[str, np.ndarray], mean_delta: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {k: (w + np.float32(self.server_lr) * mean_delta[k]).astype(np.float32) for k, w in weights.items()}

    def state(self) -> dict[str, np.ndarray]:
        return {}

    def load_state(self, state: Mapping[str, np.ndarray]) -> None:
        pass
