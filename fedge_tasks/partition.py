"""Label-skew partitions for simulating non-IID fleets."""

from __future__ import annotations

import numpy as np


def dirichlet_partition(
    labels: np.ndarray, num_clients: int, alpha: float, seed: int = 0, min_size: int = 10
) -> list[np.ndarray]:
    """Split sample indices across clients with per-class proportions ~ Dirichlet(alpha).

    Small ``alpha`` gives each client a few dominant classes (hard non-IID); large ``alpha``
    approaches an IID split. Draws are repeated until every client holds ``min_size`` samples,
    so no simulated device is empty; the result depends only on the arguments.
    """
    if num_clients < 1 or alpha <= 0:
        raise ValueError(f"need num_clients >= 1 and alpha > 0, got {num_clients}, {alpha}")
    if num_clients * min_size > len(labels):
        raise ValueError(f"{len(labels)} samples cannot give {num_clients} clients {min_size} each")
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    for _ in range(1000):
        shards: list[list[int]] = [[] for _ in range(num_clients)]
        for cls in classes:
            idx = np.flatnonzero(labels == cls)
            rng.shuffle(idx)
            proportions = rng.dirichlet(np.full(num_clients, alpha))
            cuts = (np.cumsum(proportions)[:-1] * len(idx)).astype(int)
            for shard, part in zip(shards, np.split(idx, cuts), strict=True):
                shard.extend(part.tolist())
        if min(len(s) for s in shards) >= min_size:
            return [np.sort(np.asarray(s, dtype=np.int64)) for s in shards]
    raise ValueError(f"could not give every one of {num_clients} clients {min_size} samples with alpha={alpha}")
