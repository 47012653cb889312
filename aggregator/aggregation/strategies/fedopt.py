"""Adaptive server optimisers (Reddi et al., "Adaptive Federated Optimization", ICLR 2021, Alg. 2).

With the pseudo-gradient Delta_t = the sample-weighted mean delta of round t:

    m_t = beta1 * m_{t-1} + (1 - beta1) * Delta_t                          (m_0 = 0)
    FedAdagrad: v_t = v_{t-1} + Delta_t^2
    FedYogi:    v_t = v_{t-1} - (1 - beta2) * Delta_t^2 * sign(v_{t-1} - Delta_t^2)
    FedAdam:    v_t = beta2 * v_{t-1} + (1 - beta2) * Delta_t^2
    w_{t+1} = w_t + server_lr * m_t / (sqrt(v_t) + tau)

Conventions (documented in the README): **no bias correction**, as in the paper's algorithm (the
first rounds therefore take smaller steps than bias-corrected Adam would); ``v`` starts at
``tau**2`` (the paper requires v_{-1} >= tau^2), ``m`` at zero; defaults beta1 0.9, beta2 0.99,
tau 1e-3, server_lr 0.01 (the paper's grids centre on these). Arithmetic is float64; m and v are
kept as float32, exactly what the checkpoint stores, so a restarted aggregator continues
bit-for-bit. State keys: ``<strategy>.m.<tensor>`` and ``<strategy>.v.<tensor>``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from aggregator.strategies import StrategyConfig


class _FedOpt:
    name = "fedopt"
    default_server_lr = 0.01

    def __init__(self, server_lr: float = 0.01, beta1: float = 0.9, beta2: float = 0.99, tau: float = 1e-3) -> None:
        self.server_lr, self.beta1, self.beta2, self.tau = server_lr, beta1, beta2, tau
        self._m: dict[str, np.ndarray] = {}
        self._v: dict[str, np.ndarray] = {}

    @classmethod
    def from_config(cls, config: StrategyConfig) -> _FedOpt:
        return cls(server_lr=config.server_lr or cls.default_server_lr, beta1=config.beta1, beta2=config.beta2, tau=config.tau)

    def _second_moment(self, v: np.ndarray, g2: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def apply(self, weights: Mapping[str, np.ndarray], mean_delta: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        new = {}
        for name, w in weights.items():
            delta = np.asarray(mean_delta[name], np.float64)
            m = self._m.get(name, np.zeros(w.shape, np.float32)).astype(np.float64)
            v = self._v.get(name, np.full(w.shape, self.tau**2, np.float32)).astype(np.float64)
            m32 = (self.beta1 * m + (1 - self.beta1) * delta).astype(np.float32)
            v32 = self._second_moment(v, delta * delta).astype(np.float32)
            self._m[name], self._v[name] = m32, v32
            step = self.server_lr * m32.astype(np.float64) / (np.sqrt(v32.astype(np.float64)) + self.tau)
            new[name] = (w + step).astype(np.float32)
        return new

    def state(self) -> dict[str, np.ndarray]:
        return {**{f"{self.name}.m.{k}": a for k, a in self._m.items()}, **{f"{self.name}.v.{k}": a for k, a in self._v.items()}}

    def load_state(self, state: Mapping[str, np.ndarray]) -> None:
        """Take this strategy's arrays; another strategy's state (a switched --strategy) is ignored."""
        m_prefix, v_prefix = f"{self.name}.m.", f"{self.name}.v."
        self._m = {k[len(m_prefix):]: np.asarray(a, np.float32) for k, a in state.items() if k.startswith(m_prefix)}
        self._v = {k[len(v_prefix):]: np.asarray(a, np.float32) for k, a in state.items() if k.startswith(v_prefix)}


class FedAdam(_FedOpt):
    name = "fedadam"

    def _second_moment(self, v: np.ndarray, g2: np.ndarray) -> np.ndarray:
        return self.beta2 * v + (1 - self.beta2) * g2


class FedYogi(_FedOpt):
    name = "fedyogi"

    def _second_moment(self, v: np.ndarray, g2: np.ndarray) -> np.ndarray:
        return v - (1 - self.beta2) * g2 * np.sign(v - g2)


class FedAdagrad(_FedOpt):
    name = "fedadagrad"

    def _second_moment(self, v: np.ndarray, g2: np.ndarray) -> np.ndarray:
        return v + g2
