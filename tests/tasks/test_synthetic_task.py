"""The synthetic task: a model of exactly the asked size, no data, loadable by name."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fedge_contract.tensors import ModelSpec
from fedge_tasks import TaskLoadError, load_task
from fedge_tasks.synthetic import SyntheticTask, layer_shapes
from fedge_tasks.weights import get_weights


@pytest.mark.parametrize("params,layers", [(8, 4), (10_000, 4), (100_003, 3), (1_000_000, 4), (7, 1)])
def test_layers_hold_exactly_the_asked_parameters_as_weight_bias_pairs(params, layers):
    shapes = layer_shapes(params, layers)
    assert sum(math.prod(shape) for _, shape in shapes) == params
    assert [name for name, _ in shapes] == [f"layers.{i}.{kind}" for i in range(layers) for kind in ("weight", "bias")]
    assert all(len(shape) == 2 and min(shape) >= 1 for name, shape in shapes if name.endswith("weight"))


def test_too_small_a_model_is_a_clear_error():
    with pytest.raises(TaskLoadError, match="params >= 2 x layers"):
        load_task("synthetic", {"params": "5", "layers": "4"})


def test_loaded_by_name_builds_its_seeded_weights_and_has_no_data():
    task = load_task("synthetic", {"params": "10000", "init_seed": "3"})
    assert isinstance(task, SyntheticTask) and task.params == 10_000
    weights = get_weights(task.build_model())
    assert ModelSpec.of(weights).num_parameters == 10_000
    expected = SyntheticTask(params=10_000, init_seed=3).initial_weights()
    assert list(weights) == list(expected)
    assert all(np.array_equal(weights[k], expected[k]) for k in weights)
    assert not np.array_equal(weights["layers.0.weight"], SyntheticTask(params=10_000, init_seed=4).initial_weights()["layers.0.weight"])
    assert task.eval_data() is None  # the aggregator skips evaluation
    with pytest.raises(TaskLoadError, match="no data"):
        task.train_data("agent-0")
