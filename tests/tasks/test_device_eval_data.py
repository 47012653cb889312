"""Held-out data on devices (federated evaluation): the optional eval_data(client_id)."""

from __future__ import annotations

import numpy as np
import pytest

from fedge_tasks.base import device_eval_data, evaluates_on_devices, load_task, server_eval_data
from fedge_tasks.digits import DigitsTask, load_split
from fedge_tasks.partition import dirichlet_partition, split_like


def test_digits_device_shares_are_exactly_the_servers_held_out_set():
    task = DigitsTask(clients=20)
    server = server_eval_data(task)
    shares = [device_eval_data(task, f"agent-{i}") for i in range(20)]
    pooled = sorted(map(tuple, np.concatenate([s.tensors[0].numpy() for s in shares if s is not None]).tolist()))
    assert sum(len(s) for s in shares if s is not None) == len(server) == 360
    assert pooled == sorted(map(tuple, server.tensors[0].numpy().tolist()))
    again = device_eval_data(DigitsTask(clients=20), "agent-3")
    assert again is not None and shares[3] is not None and np.array_equal(again.tensors[1].numpy(), shares[3].tensors[1].numpy())


def test_a_devices_held_out_labels_follow_its_training_shard():
    """Label skew: a device's held-out classes are (nearly) those it trains on."""
    task = DigitsTask(clients=10, alpha=0.1)
    for i in range(10):
        train = np.bincount(task.train_data(f"agent-{i}").tensors[1].numpy(), minlength=10)
        held = device_eval_data(task, f"agent-{i}")
        if held is None:
            continue
        test = np.bincount(held.tensors[1].numpy(), minlength=10)
        assert test[train == 0].sum() == 0  # a class the device never trains on is never in its held-out split


def test_split_like_is_a_partition_in_proportion():
    labels = np.repeat(np.arange(3), 30)
    shards = dirichlet_partition(labels, 4, 1.0, seed=1, min_size=5)
    other = np.repeat(np.arange(3), 10)
    parts = split_like(shards, labels, other)
    assert sorted(np.concatenate(parts).tolist()) == list(range(30))
    for cls in range(3):
        share = np.array([np.count_nonzero(labels[s] == cls) for s in shards]) / 30
        got = np.array([np.count_nonzero(other[p] == cls) for p in parts])
        assert np.all(np.abs(got - share * 10) < 1)  # largest remainder: within one sample


def test_a_hundred_devices_at_alpha_half_with_min_samples():
    with pytest.raises(ValueError):
        DigitsTask(clients=100, alpha=0.5).train_data("agent-1")
    task = DigitsTask(clients=100, alpha=0.5, min_samples=5)
    assert all(len(task.train_data(f"agent-{i}")) >= 5 for i in range(100))
    held = [device_eval_data(task, f"agent-{i}") for i in range(100)]
    assert sum(len(h) for h in held if h is not None) == len(load_split()[3])


class ServerOnly:
    def build_model(self) -> object: ...
    def train_data(self, client_id: str) -> object: ...
    def eval_data(self) -> str:
        return "server"


class NoEval:
    def build_model(self) -> object: ...
    def train_data(self, client_id: str) -> object: ...


def test_eval_data_is_optional_on_both_sides():
    assert server_eval_data(ServerOnly()) == "server" and device_eval_data(ServerOnly(), "a") is None
    assert not evaluates_on_devices(ServerOnly()) and evaluates_on_devices(DigitsTask())
    assert server_eval_data(NoEval()) is None and device_eval_data(NoEval(), "a") is None
    assert server_eval_data(load_task("synthetic", {"params": "10"})) is None
    assert device_eval_data(load_task("synthetic", {"params": "10"}), "agent-1") is None


def test_a_task_without_eval_data_loads(monkeypatch):
    import sys
    import types

    module = types.ModuleType("noeval_task")
    module.NoEval = NoEval  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "noeval_task", module)
    assert isinstance(load_task("noeval_task:NoEval"), NoEval)
