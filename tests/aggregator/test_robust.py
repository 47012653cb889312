"""Robust rules against values computed by hand."""

from __future__ import annotations

import numpy as np
import pytest
from numpy.testing import assert_allclose, assert_array_equal

from aggregator.aggregation.robust import Stacked, coordinate_median, krum_scores, multi_krum, trimmed_mean
from fedge_contract.tensors import ModelSpec

ROWS = np.array(
    [
        [1.0, 10.0],
        [2.0, 20.0],
        [3.0, 30.0],
        [4.0, 40.0],
        [100.0, -1000.0],  # the attacker
    ],
    dtype=np.float32,
)


def test_coordinate_median_ignores_one_outlier_per_coordinate():
    assert_array_equal(coordinate_median(ROWS), [3.0, 20.0])  # sorted columns: 1 2 3 4 100 / -1000 10 20 30 40
    assert_array_equal(coordinate_median(ROWS[:4]), [2.5, 25.0])  # even count: mean of the two middle values


def test_trimmed_mean_drops_k_from_each_end_per_coordinate():
    # fraction 0.2 of 5 -> k = 1: column 0 keeps 2 3 4 -> 3; column 1 keeps 10 20 30 -> 20
    assert_allclose(trimmed_mean(ROWS, 0.2), [3.0, 20.0])
    # fraction 0.1 of 5 -> k = 0: the plain mean
    assert_allclose(trimmed_mean(ROWS, 0.1), [22.0, -180.0])
    # never trims everything: 2 rows, fraction 0.49 -> k = 0
    assert_allclose(trimmed_mean(ROWS[:2], 0.49), [1.5, 15.0])


def test_krum_scores_by_hand():
    rows = np.array([[0.0], [1.0], [3.0], [10.0]])
    # n = 4, f = 0: each row's 2 nearest others. 0: 1+9=10; 1: 1+4=5; 3: 4+9=13; 10: 49+81=130
    assert_allclose(krum_scores(rows, 0), [10.0, 5.0, 13.0, 130.0])


def test_multi_krum_keeps_the_clustered_rows_and_weights_them_by_samples():
    weights = np.array([1.0, 1.0, 2.0, 1.0, 50.0])
    mean, chosen = multi_krum(ROWS, weights, 0.2)
    # f = 1: the attacker (row 4) has the worst score and is dropped; the other 4 are averaged 1:1:2:1
    assert_array_equal(chosen, [0, 1, 2, 3])
    assert_allclose(mean, [(1 + 2 + 6 + 4) / 5, (10 + 20 + 60 + 40) / 5])


def test_multi_krum_with_too_few_rows_for_its_fraction_still_aggregates():
    mean, chosen = multi_krum(ROWS[:2], np.ones(2), 0.4)
    assert_array_equal(chosen, [0, 1])
    assert_allclose(mean, [1.5, 15.0])


def test_stacked_reshapes_rows_back_into_the_model_and_is_bounded():
    spec = ModelSpec.of({"w": np.zeros((2, 2), np.float32), "b": np.zeros(1, np.float32)})
    stack = Stacked(spec, capacity=3, rule="median")
    for value in (1.0, 2.0, 9.0):
        stack.add({"w": np.full((2, 2), value, np.float32), "b": np.array([-value], np.float32)}, 10)
    with pytest.raises(ValueError, match="capacity"):
        stack.add({"w": np.zeros((2, 2), np.float32), "b": np.zeros(1, np.float32)}, 1)
    out = stack.mean()
    assert_array_equal(out["w"], np.full((2, 2), 2.0))
    assert_array_equal(out["b"], [-2.0])
    assert stack.count == 3 and stack.total_weight == 30


def test_stacked_refuses_bad_weights_and_empty_rounds():
    spec = ModelSpec.of({"w": np.zeros(2, np.float32)})
    stack = Stacked(spec, capacity=2, rule="krum")
    with pytest.raises(ValueError):
        stack.mean()
    with pytest.raises(ValueError):
        stack.add({"w": np.zeros(2, np.float32)}, float("nan"))
