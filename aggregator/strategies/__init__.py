"""Server-side aggregation strategies behind one small interface.

The round loop folds accepted deltas into a WeightedSum; a strategy turns the mean delta into
the next global model. Strategy state (e.g. server momentum) is saved in each checkpoint so a
restarted aggregator does not reset it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

import numpy as np

from aggregator.strategies.fedavg import FedAvg


class Strategy(Protocol):
    name: str

    def apply(self, weights: Mapping[str, np.ndarray], mean_delta: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The next global weights."""
        ...

    def state(self) -> dict[str, np.ndarray]:
        """Arrays to persist with the checkpoint."""
        ...

    def load_state(self, state: Mapping[str, np.ndarray]) -> None: ...


STRATEGIES: dict[str, type] = {"fedavg": FedAvg}


def make_strategy(name: str) -> Strategy:
    try:
        return STRATEGIES[name]()  # type: ignore[no-any-return]
    except KeyError:
        raise ValueError(f"unknown strategy {name!r} (known: {', '.join(STRATEGIES)})") from None


__all__ = ["FedAvg", "STRATEGIES", "Strategy", "make_strategy"]
