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


def split_like(shards: list[np.ndarray], labels: np.ndarray, other_labels: np.ndarray) -> list[np.ndarray]:
    """Split every index of ``other_labels`` across the clients of ``shards`` (a partition of
    ``labels``): each class goes to the clients in proportion to their share of that class in
    ``shards`` (largest remainder; a class no client holds is split evenly).

    Each client's part then has its own label skew, and the parts together are exactly
    ``other_labels``: deterministic, no randomness.
    """
    parts: list[list[int]] = [[] for _ in shards]
    for cls in np.unique(other_labels):
        idx = np.flatnonzero(other_labels == cls)
        held = np.array([np.count_nonzero(labels[s] == cls) for s in shards], dtype=np.float64)
        if held.sum() == 0:
            held[:] = 1.0
        exact = held / held.sum() * len(idx)
        take = np.floor(exact).astype(int)
        take[np.argsort(-(exact - take), kind="stable")[: len(idx) - int(take.sum())]] += 1
        for part, chunk in zip(parts, np.split(idx, np.cumsum(take)[:-1]), strict=True):
            part.extend(chunk.tolist())
    return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]
