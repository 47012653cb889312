"""WeightedSum: the streaming weighted mean, checked against hand-computed numbers."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from aggregator.aggregation.fold import WeightedSum
from fedge_contract.tensors import ModelSpec, TensorSpec

SPEC = ModelSpec((TensorSpec("w", (2,)), TensorSpec("b", (1,))))


def f32(*values: float) -> np.ndarray:
    return np.array(values, np.float32)


def test_weighted_mean_by_hand() -> None:
    acc = WeightedSum(SPEC)
    acc.add({"w": f32(1, 2), "b": f32(4)}, 1)
    acc.add({"w": f32(3, 6), "b": f32(-4)}, 3)
    # w: (1*[1,2] + 3*[3,6]) / 4 = [10, 20] / 4;  b: (4 - 12) / 4
    mean = acc.mean()
    np.testing.assert_array_equal(mean["w"], f32(2.5, 5.0))
    np.testing.assert_array_equal(mean["b"], f32(-2.0))
    assert mean["w"].dtype == np.float32 and mean["b"].dtype == np.float32
    assert acc.count == 2 and acc.total_weight == 4.0


def test_single_update_is_its_own_mean() -> None:
    acc = WeightedSum(SPEC)
    acc.add({"w": f32(0.1, -0.7), "b": f32(3.25)}, 17)
    mean = acc.mean()
    np.testing.assert_array_equal(mean["w"], f32(0.1, -0.7))
    np.testing.assert_array_equal(mean["b"], f32(3.25))


def test_three_clients_by_hand() -> None:
    spec = ModelSpec((TensorSpec("m", (2, 2)),))
    acc = WeightedSum(spec)
    acc.add({"m": np.array([[1, 0], [0, 1]], np.float32)}, 2)
    acc.add({"m": np.array([[0, 4], [4, 0]], np.float32)}, 1)
    acc.add({"m": np.array([[-1, -1], [2, 2]], np.float32)}, 1)
    # sum = [[2-1, 4-1], [4+2, 2+2]] = [[1, 3], [6, 4]]; / 4
    np.testing.assert_array_equal(acc.mean()["m"], np.array([[0.25, 0.75], [1.5, 1.0]], np.float32))


def test_float64_accumulator_absorbs_cancellation() -> None:
    """In float32, 1e8 + 1 - 1e8 is 0 or 1 depending on order; the float64 sum gives 1 either way."""
    spec = ModelSpec((TensorSpec("x", (1,)),))
    deltas = [f32(1e8), f32(1.0), f32(-1e8)]
    for order in itertools.permutations(deltas):
        acc = WeightedSum(spec)
        for delta in order:
            acc.add({"x": delta}, 1)
        assert acc.mean()["x"][0] == np.float32(1 / 3)


def test_order_independence_is_bitwise() -> None:
    rng = np.random.default_rng(0)
    spec = ModelSpec((TensorSpec("w", (64, 32)), TensorSpec("b", (32,))))
    updates = [
        (
            {t.name: rng.normal(0, 10.0 ** rng.integers(-3, 3), t.shape).astype(np.float32) for t in spec.tensors},
            int(rng.integers(1, 500)),
        )
        for _ in range(8)
    ]

    def fold(order: list[int]) -> dict[str, np.ndarray]:
        acc = WeightedSum(spec)
        for i in order:
            acc.add(*updates[i])
        return acc.mean()

    reference = fold(list(range(8)))
    for order in (list(range(7, -1, -1)), [3, 0, 7, 5, 1, 6, 2, 4]):
        other = fold(order)
        for name in reference:
            assert other[name].tobytes() == reference[name].tobytes()


@pytest.mark.parametrize("weight", [0, 0.0, -1, -0.5])
def test_non_positive_weight_is_refused(weight: float) -> None:
    acc = WeightedSum(SPEC)
    with pytest.raises(ValueError):
        acc.add({"w": f32(1, 2), "b": f32(3)}, weight)
    assert acc.count == 0 and acc.total_weight == 0.0


def test_mean_of_nothing_is_an_error() -> None:
    with pytest.raises(ValueError):
        WeightedSum(SPEC).mean()


def test_folding_continues_after_mean() -> None:
    acc = WeightedSum(SPEC)
    acc.add({"w": f32(2, 2), "b": f32(0)}, 1)
    first = acc.mean()
    acc.add({"w": f32(4, 0), "b": f32(0)}, 1)
    np.testing.assert_array_equal(first["w"], f32(2, 2))  # an earlier result is not mutated
    np.testing.assert_array_equal(acc.mean()["w"], f32(3, 1))


def _updates(spec: ModelSpec, n: int, seed: int = 0) -> list[tuple[dict[str, np.ndarray], int]]:
    rng = np.random.default_rng(seed)
    return [({t.name: rng.normal(0, 1, t.shape).astype(np.float32) for t in spec.tensors}, int(rng.integers(1, 500))) for _ in range(n)]


def test_merged_partial_sums_equal_one_sum() -> None:
    """The fold is associative: two workers' partial sums, merged, are the single aggregator's sum."""
    spec = ModelSpec((TensorSpec("w", (16, 8)), TensorSpec("b", (8,))))
    updates = _updates(spec, 9)
    single, left, right = WeightedSum(spec), WeightedSum(spec), WeightedSum(spec)
    for i, (delta, weight) in enumerate(updates):
        single.add(delta, weight)
        (left if i % 3 else right).add(delta, weight)
    left.merge(right)
    assert (left.count, left.total_weight) == (single.count, single.total_weight) == (9, sum(w for _, w in updates))
    for name, value in single.mean().items():
        np.testing.assert_allclose(left.mean()[name], value, rtol=1e-7, atol=0)


def test_a_partial_sum_crosses_a_pipe_unchanged() -> None:
    import msgpack

    spec = ModelSpec((TensorSpec("w", (4, 3)), TensorSpec("b", (3,))))
    direct, via_wire, part = WeightedSum(spec), WeightedSum(spec), WeightedSum(spec)
    for delta, weight in _updates(spec, 4, seed=1):
        part.add(delta, weight)
    direct.merge(part)
    via_wire.merge_wire(msgpack.unpackb(msgpack.packb(part.to_wire(), use_bin_type=True), raw=False))
    assert (via_wire.count, via_wire.total_weight) == (direct.count, direct.total_weight)
    for name, value in direct.mean().items():
        assert via_wire.mean()[name].tobytes() == value.tobytes()


def test_merging_an_empty_partial_changes_nothing() -> None:
    acc = WeightedSum(SPEC)
    acc.add({"w": f32(1, 2), "b": f32(3)}, 2)
    acc.merge(WeightedSum(SPEC))
    assert (acc.count, acc.total_weight) == (1, 2.0)
    np.testing.assert_array_equal(acc.mean()["w"], f32(1, 2))


def test_partial_sums_of_another_model_are_refused() -> None:
    other = ModelSpec((TensorSpec("w", (3,)), TensorSpec("b", (1,))))
    acc = WeightedSum(SPEC)
    with pytest.raises(ValueError, match="different models"):
        acc.merge(WeightedSum(other))
    with pytest.raises(ValueError, match="different models"):
        acc.merge_wire(WeightedSum(other).to_wire())
    assert acc.count == 0
