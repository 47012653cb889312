"""A model of a chosen size and nothing else: the aggregator's side of ``fedge simulate --synthetic``.

Load tests measure the transport and the aggregator, not learning: the model is ``params``
float32 values in ``layers`` layer-like pairs (a weight matrix and a bias vector), initialised
from ``init_seed``; there is no data. ``eval_data`` returns None, which the aggregator reads as
"nothing to evaluate", and ``train_data`` refuses with a clear error: synthetic agents
(fedge.simulate.synthetic) never train, they send seeded noise shaped like the global model.

``shapes()`` needs no torch, so tools can learn the model's spec without importing it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from fedge_tasks.base import TaskLoadError


def layer_shapes(params: int, layers: int) -> list[tuple[str, tuple[int, ...]]]:
    """``layers`` (weight, bias) pairs holding exactly ``params`` values, as square as they come.

    Each layer gets ``params // layers`` values (the last one the remainder too): a weight of
    ``rows x width`` with ``width ~ sqrt(n)`` and a bias of the rest (about ``width`` values).
    """
    if layers < 1 or params < 2 * layers:
        raise TaskLoadError(f"synthetic: need layers >= 1 and params >= 2 x layers, got params={params}, layers={layers}")
    per = params // layers
    shapes: list[tuple[str, tuple[int, ...]]] = []
    for i in range(layers):
        n = per + (params - per * layers if i == layers - 1 else 0)
        width = max(1, min(1024, math.isqrt(n)))
        rows = n // (width + 1)
        shapes.append((f"layers.{i}.weight", (rows, width)))
        shapes.append((f"layers.{i}.bias", (n - rows * width,)))
    return shapes


@dataclass(frozen=True)
class SyntheticTask:
    params: int = 1_000_000
    layers: int = 4
    init_seed: int = 0

    def __post_init__(self) -> None:
        layer_shapes(self.params, self.layers)  # validates

    def shapes(self) -> list[tuple[str, tuple[int, ...]]]:
        return layer_shapes(self.params, self.layers)

    def initial_weights(self) -> dict[str, np.ndarray]:
        """N(0, 0.05^2) from ``init_seed``: a model that is not all zeros, reproducibly."""
        rng = np.random.default_rng(self.init_seed)
        return {name: rng.standard_normal(shape, dtype=np.float32) * np.float32(0.05) for name, shape in self.shapes()}

    def build_model(self) -> Any:
        import torch

        class SyntheticModel(torch.nn.Module):
            """Parameters only (``layers.<i>.weight``/``bias``); calling it is not supported."""

            def __init__(self, weights: dict[str, np.ndarray]) -> None:
                super().__init__()
                self.layers = torch.nn.ModuleList()
                for i in range(len(weights) // 2):
                    layer = torch.nn.Module()
                    layer.weight = torch.nn.Parameter(torch.from_numpy(weights[f"layers.{i}.weight"]))
                    layer.bias = torch.nn.Parameter(torch.from_numpy(weights[f"layers.{i}.bias"]))
                    self.layers.append(layer)

        return SyntheticModel(self.initial_weights())

    def train_data(self, client_id: str) -> Any:
        raise TaskLoadError(
            "the synthetic task has no data: its agents are fedge simulate --synthetic's, which send seeded noise instead of training"
        )

    def eval_data(self) -> None:
        return None  # nothing to evaluate: rounds report no accuracy
