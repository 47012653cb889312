"""How a round's announcement tells the devices that the round is secure, and what they need beyond the Setup.

The global model of a secure round carries ``task.extra["secure_aggregation"]``: a device that
sees it trains as usual but hands its delta to the protocol session (edge_agent/secure_aggregation.py)
instead of publishing an Update. The Setup (``secagg/down/setup``) says who is invited and the
ring's parameters; the announcement adds what turns a delta into the vector the ring sums:

- ``max_weight``: FedAvg's weighting through a sum (``Weighting``): a device's weight is
  ``min(num_samples, max_weight) / max_weight``. The aggregator divides by the same cap, so both
  sides must agree on it, and the device learns it here.
- ``clip_norm``: an L2 bound the device applies to its delta before encoding (the aggregator
  cannot clip what it never sees); None: only the Setup's per-coordinate clip applies.

An old agent ignores unknown ``extra`` keys and would send a plain Update; the aggregator's secure
round then refuses it (DESIGN.md, refused combinations), so mixing versions fails loudly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from fedge_contract.errors import DecodeError, Reason
from fedge_contract.messages import TaskConfig
from fedge_contract.secagg.errors import ParameterError
from fedge_contract.secagg.fixedpoint import Weighting

EXTRA_KEY = "secure_aggregation"
MAX_WEIGHT = 1 << 40


@dataclass(frozen=True)
class SecureRound:
    max_weight: int = 1000
    clip_norm: float | None = None

    def __post_init__(self) -> None:
        if not 1 <= self.max_weight <= MAX_WEIGHT:
            raise ParameterError(f"max_weight must be in 1..{MAX_WEIGHT}, got {self.max_weight}")
        if self.clip_norm is not None and not (math.isfinite(self.clip_norm) and self.clip_norm > 0):
            raise ParameterError(f"clip_norm must be finite and > 0, got {self.clip_norm}")

    def to_extra(self) -> dict[str, Any]:
        """What the aggregator merges into the round's ``TaskConfig.extra``."""
        return {EXTRA_KEY: {"max_weight": self.max_weight, "clip_norm": self.clip_norm}}

    @classmethod
    def of(cls, task: TaskConfig) -> SecureRound | None:
        """The secure-round parameters of an announcement's task, None for a plain round; DecodeError if malformed."""
        if EXTRA_KEY not in task.extra:
            return None
        value = task.extra[EXTRA_KEY]
        if not isinstance(value, dict):
            raise DecodeError(Reason.WRONG_TYPE, f"task.{EXTRA_KEY} must be a map, got {type(value).__name__}")
        max_weight, clip_norm = value.get("max_weight"), value.get("clip_norm")
        if not isinstance(max_weight, int) or isinstance(max_weight, bool):
            raise DecodeError(Reason.WRONG_TYPE, f"task.{EXTRA_KEY}.max_weight must be an integer")
        if clip_norm is not None and (not isinstance(clip_norm, (int, float)) or isinstance(clip_norm, bool)):
            raise DecodeError(Reason.WRONG_TYPE, f"task.{EXTRA_KEY}.clip_norm must be a number or null")
        try:
            return cls(max_weight=max_weight, clip_norm=None if clip_norm is None else float(clip_norm))
        except (ParameterError, OverflowError) as exc:
            raise DecodeError(Reason.BAD_VALUE, f"task.{EXTRA_KEY}: {exc}") from None

    def weighting(self, clip: float) -> Weighting:
        """The weighting for a Setup whose per-coordinate clipping range is ``clip``."""
        return Weighting(clip=clip, max_weight=self.max_weight)

    def bounded(self, delta: np.ndarray) -> np.ndarray:
        """``delta`` (flat) scaled down to ``clip_norm`` when its L2 norm exceeds it; float64."""
        flat = np.asarray(delta, dtype=np.float64).ravel()
        if self.clip_norm is None:
            return flat
        norm = float(np.linalg.norm(flat))
        return flat * (self.clip_norm / norm) if norm > self.clip_norm else flat
