"""TEST-ONLY: make a simulated agent malicious, to measure the aggregator's defences.

``AgentConfig.attack`` (hidden flag ``fedge simulate --attack ID=KIND``, used by
``bench/poisoning.py``) rewrites the delta just before it is encoded:

- ``none``: the honest delta (the default; every real deployment);
- ``scale10``: the delta times 10 (model replacement / boosting);
- ``signflip``: the delta times -1 (gradient ascent);
- ``signflip10``: the delta times -10 (both: the strongest of these against a plain mean);
- ``nan``: every value NaN (a broken or hostile device; the aggregator must reject it).

It is deliberately not reachable from ``fedge agent``: a real device never needs it.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

ATTACKS = ("none", "scale10", "signflip", "signflip10", "nan")


def attacked(delta: Mapping[str, np.ndarray], attack: str) -> dict[str, np.ndarray]:
    if attack == "none":
        return dict(delta)
    if attack == "scale10":
        return {k: v * np.float32(10.0) for k, v in delta.items()}
    if attack == "signflip":
        return {k: -v for k, v in delta.items()}
    if attack == "signflip10":
        return {k: v * np.float32(-10.0) for k, v in delta.items()}
    if attack == "nan":
        return {k: np.full_like(v, np.nan) for k, v in delta.items()}
    raise ValueError(f"unknown attack {attack!r} (known: {', '.join(ATTACKS)})")
