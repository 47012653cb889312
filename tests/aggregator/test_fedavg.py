"""FedAvg: next model = global + server_lr * sample-weighted mean delta."""

from __future__ import annotations

import numpy as np
import pytest

from aggregator.aggregation.fold import WeightedSum
from aggregator.aggregation.strategies import STRATEGIES, FedAvg, make_strategy
from fedge_contract.tensors import ModelSpec


def f32(*values: float) -> np.ndarray:
    return np.array(values, np.float32)


def test_apply_by_hand() -> None:
    weights = {"w": f32(1, 2), "b": f32(0.5)}
    new = FedAvg().apply(weights, {"w": f32(0.5, -1), "b": f32(0.25)})
    np.testing.assert_array_equal(new["w"], f32(1.5, 1.0))
    np.testing.assert_array_equal(new["b"], f32(0.75))
    assert all(v.dtype == np.float32 for v in new.values())
    np.testing.assert_array_equal(weights["w"], f32(1, 2))  # input untouched


def test_server_learning_rate() -> None:
    new = FedAvg(server_lr=0.5).apply({"w": f32(1, 2)}, {"w": f32(0.5, -1)})
    np.testing.assert_array_equal(new["w"], f32(1.25, 1.5))


def test_float64_weights_come_back_float32() -> None:
    new = FedAvg().apply({"w": np.array([1.0, 2.0])}, {"w": f32(1, 1)})
    assert new["w"].dtype == np.float32
    np.testing.assert_array_equal(new["w"], f32(2, 3))


def test_one_round_end_to_end_by_hand() -> None:
    """Two clients trained from global [10, 10]: local [11, 12] on 1 sample, [13, 16] on 3 samples."""
    global_weights = {"w": f32(10, 10)}
    acc = WeightedSum(ModelSpec.of(global_weights))
    for local, samples in ((f32(11, 12), 1), (f32(13, 16), 3)):
        acc.add({"w": local - global_weights["w"]}, samples)
    new = FedAvg().apply(global_weights, acc.mean())
    # mean delta = (1*[1, 2] + 3*[3, 6]) / 4 = [2.5, 5.0]
    np.testing.assert_array_equal(new["w"], f32(12.5, 15.0))


def test_state_is_empty_and_loading_it_is_harmless() -> None:
    strategy = FedAvg()
    assert strategy.state() == {}
    strategy.load_state({})
    np.testing.assert_array_equal(strategy.apply({"w": f32(1)}, {"w": f32(1)})["w"], f32(2))


def test_make_strategy() -> None:
    assert isinstance(make_strategy("fedavg"), FedAvg)
    assert make_strategy("fedavg").name == "fedavg"
    assert "fedavg" in STRATEGIES
    with pytest.raises(ValueError, match="fedprox"):
        make_strategy("fedprox")
