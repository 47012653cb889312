"""Dirichlet label-skew partitions: deterministic, a true partition, and skewed by alpha."""

from __future__ import annotations

import numpy as np
import pytest

from fedge_tasks.partition import dirichlet_partition

LABELS = np.random.default_rng(123).permutation(np.repeat(np.arange(10), 100))  # 1000 samples, 10 classes


def mean_label_entropy(shards: list[np.ndarray], labels: np.ndarray) -> float:
    entropies = []
    for shard in shards:
        counts = np.bincount(labels[shard], minlength=10).astype(float)
        p = counts[counts > 0] / counts.sum()
        entropies.append(float(-(p * np.log(p)).sum()))
    return float(np.mean(entropies))


def test_deterministic() -> None:
    first = dirichlet_partition(LABELS, 10, 0.5, seed=3)
    second = dirichlet_partition(LABELS, 10, 0.5, seed=3)
    assert len(first) == len(second) == 10
    for a, b in zip(first, second, strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("alpha", [0.1, 0.5, 100.0])
def test_disjoint_and_covering(alpha: float) -> None:
    shards = dirichlet_partition(LABELS, 10, alpha, seed=0)
    everything = np.concatenate(shards)
    assert len(everything) == len(LABELS)  # no index twice
    np.testing.assert_array_equal(np.sort(everything), np.arange(len(LABELS)))  # every index once
    for shard in shards:
        assert shard.dtype == np.int64
        assert np.all(np.diff(shard) > 0)  # sorted, unique


@pytest.mark.parametrize("min_size", [1, 10, 50])
def test_every_client_gets_min_size(min_size: int) -> None:
    shards = dirichlet_partition(LABELS, 10, 0.3, seed=1, min_size=min_size)
    assert min(len(s) for s in shards) >= min_size


def test_different_seed_different_partition() -> None:
    a = dirichlet_partition(LABELS, 10, 0.5, seed=0)
    b = dirichlet_partition(LABELS, 10, 0.5, seed=1)
    assert any(len(x) != len(y) or not np.array_equal(x, y) for x, y in zip(a, b, strict=True))


def test_smaller_alpha_means_more_skew() -> None:
    skewed = mean_label_entropy(dirichlet_partition(LABELS, 10, 0.1, seed=0), LABELS)
    iid = mean_label_entropy(dirichlet_partition(LABELS, 10, 100.0, seed=0), LABELS)
    assert iid > 0.95 * np.log(10)  # near-uniform labels per client
    assert skewed < 0.6 * iid


def test_single_client_gets_everything() -> None:
    (only,) = dirichlet_partition(LABELS, 1, 0.5)
    np.testing.assert_array_equal(only, np.arange(len(LABELS)))


@pytest.mark.parametrize(
    "num_clients, alpha, min_size",
    [(0, 0.5, 10), (10, 0.0, 10), (10, -1.0, 10), (101, 0.5, 10), (10, 0.5, 101)],
)
def test_invalid_arguments(num_clients: int, alpha: float, min_size: int) -> None:
    with pytest.raises(ValueError):
        dirichlet_partition(LABELS, num_clients, alpha, min_size=min_size)


def test_impossible_min_size_gives_up_with_value_error() -> None:
    labels = np.zeros(30, np.int64)  # one class, 3 clients of >= 10: only an exact 1/3-1/3-1/3 draw works
    with pytest.raises(ValueError, match="could not"):
        dirichlet_partition(labels, 3, 0.001, min_size=10)
