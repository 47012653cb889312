"""The built-in example task: handwritten digits (the 8x8 images scikit-learn bundles, shipped in ``data/``).

Pixels are scaled to [0, 1]; a fixed stratified 80/20 split (seed 0) gives the held-out set; the
training split is divided across ``clients`` devices by a Dirichlet(``alpha``) label skew (numpy
seed ``seed``), and the held-out set across the same devices in the same label proportions (each
device's own held-out split, for federated evaluation). A device's shard is chosen by the integer
its client id ends with
(``agent-7`` holds shard 7 modulo ``clients``): on real hardware a task would read the device's
own files instead.
"""

from __future__ import annotations

import functools
import gzip
import math
import re
from dataclasses import dataclass
from importlib import resources

import numpy as np
import torch
from torch.utils.data import TensorDataset

from fedge_tasks.base import TaskLoadError
from fedge_tasks.partition import dirichlet_partition, split_like

_TRAILING_INT = re.compile(r"(\d+)$")


def _bundled_digits() -> tuple[np.ndarray, np.ndarray]:
    """The 1797 8x8 digits, from the copy of scikit-learn's data file that fedge ships (``data/``).

    Importing scikit-learn costs ~1 s and ~80 MiB in every process that loads the task, and
    installing it tens of MiB on a device; the CSV is all the task needs (its licence:
    ``data/DIGITS-LICENSE.md``).
    """
    data = resources.files("fedge_tasks").joinpath("data", "digits.csv.gz")
    try:
        with data.open("rb") as compressed, gzip.open(compressed) as raw:
            table = np.loadtxt(raw, delimiter=",")
    except FileNotFoundError:
        raise TaskLoadError(f"the digits task's data file {data} is missing: reinstall fedge") from None
    return table[:, :-1], table[:, -1].astype(np.int64)


def stratified_split(labels: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, test) indices with every class split in the same proportion.

    Per-class test counts are allocated by largest remainder so the test set is exactly
    ceil(test_fraction * n) samples (as scikit-learn counts); the shuffle is numpy's default_rng(seed).
    """
    rng = np.random.default_rng(seed)
    classes, counts = np.unique(labels, return_counts=True)
    exact = counts * test_fraction
    take = np.floor(exact).astype(int)
    short = math.ceil(test_fraction * len(labels)) - int(take.sum())
    take[np.argsort(-(exact - take), kind="stable")[:short]] += 1
    train, test = [], []
    for cls, k in zip(classes, take, strict=True):
        idx = rng.permutation(np.flatnonzero(labels == cls))
        test.append(idx[:k])
        train.append(idx[k:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


@functools.lru_cache(maxsize=1)
def load_split() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(x_train, y_train, x_test, y_test): pixels scaled to [0, 1], always the same split."""
    pixels, labels = _bundled_digits()
    x = (pixels / 16.0).astype(np.float32)
    train, test = stratified_split(labels, 0.2, seed=0)
    return x[train], labels[train], x[test], labels[test]


@functools.lru_cache(maxsize=8)
def _partition(clients: int, alpha: float, seed: int, min_samples: int = 10) -> tuple[np.ndarray, ...]:
    return tuple(dirichlet_partition(load_split()[1], clients, alpha, seed, min_size=min_samples))


@functools.lru_cache(maxsize=8)
def _held_out(clients: int, alpha: float, seed: int, min_samples: int) -> tuple[np.ndarray, ...]:
    """The test split divided across devices with each device's own label skew (its training shard's)."""
    _, y_train, _, y_test = load_split()
    return tuple(split_like(list(_partition(clients, alpha, seed, min_samples)), y_train, y_test))


@dataclass(frozen=True)
class DigitsTask:
    clients: int = 20
    alpha: float = 0.5
    seed: int = 0  # partition seed
    hidden: int = 128
    init_seed: int = 0  # seed of the initial global weights
    min_samples: int = 10  # every device's training shard holds at least this many (100 devices at alpha 0.5 need 5)

    def build_model(self) -> torch.nn.Module:
        """The MLP with torch's default initialisation drawn from a generator of its own, seeded with ``init_seed``.

        Not ``torch.manual_seed``: the global generator is shared by every thread of the process, and an
        aggregator and in-process agents building their models at the same time drew each other's
        numbers (a different v0 from run to run). The draws are the ones ``manual_seed(init_seed)``
        then ``nn.Linear`` made, in the same order, so the weights are the same as before.
        """
        generator = torch.Generator().manual_seed(self.init_seed)
        first = torch.nn.utils.skip_init(torch.nn.Linear, 64, self.hidden)  # (B, 64) -> (B, hidden)
        second = torch.nn.utils.skip_init(torch.nn.Linear, self.hidden, 10)  # -> (B, 10) logits
        with torch.no_grad():
            for layer in (first, second):  # nn.Linear.reset_parameters, with our generator
                torch.nn.init.kaiming_uniform_(layer.weight, a=math.sqrt(5), generator=generator)
                bound = 1 / math.sqrt(layer.in_features)
                layer.bias.uniform_(-bound, bound, generator=generator)
        return torch.nn.Sequential(first, torch.nn.ReLU(), second)

    def suggested_training(self) -> dict[str, float | int]:
        """Local training that reaches ~0.95 in 30 FedAvg rounds on 20 clients (Dirichlet 0.5, seeds 0-2)."""
        return {"local_epochs": 3, "batch_size": 16, "lr": 0.5}

    def shard_of(self, client_id: str) -> int:
        match = _TRAILING_INT.search(client_id)
        if match is None:
            raise TaskLoadError(f"digits: client id {client_id!r} must end with a number that picks its shard")
        return int(match.group(1)) % self.clients

    def train_data(self, client_id: str) -> TensorDataset:
        x, y, _, _ = load_split()
        idx = _partition(self.clients, self.alpha, self.seed, self.min_samples)[self.shard_of(client_id)]
        return TensorDataset(torch.from_numpy(x[idx]), torch.from_numpy(y[idx]))

    def eval_data(self, client_id: str | None = None) -> TensorDataset | None:
        """The aggregator's held-out set (no client id), or a device's share of it.

        A device's share follows its training shard's labels (``split_like``), and the shares of
        all ``clients`` devices are exactly the aggregator's set: federated evaluation over every
        device equals the server's. With many devices a share is small (360 test samples over 100
        devices: ~3.6 each), and a device with none reports nothing (None).
        """
        _, _, x, y = load_split()
        if client_id is not None:
            idx = _held_out(self.clients, self.alpha, self.seed, self.min_samples)[self.shard_of(client_id)]
            if len(idx) == 0:
                return None
            x, y = x[idx], y[idx]
        return TensorDataset(torch.from_numpy(x), torch.from_numpy(y))
