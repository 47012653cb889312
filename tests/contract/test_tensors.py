"""Tensor specs: wire dtypes, sizes and the architecture fingerprint."""

from __future__ import annotations

import numpy as np
import pytest

from fedge_contract.tensors import ModelSpec, TensorSpec, nbytes, wire_dtype_of

BASE = ModelSpec((TensorSpec("fc.weight", (10, 64)), TensorSpec("fc.bias", (10,))))


def test_fingerprint_is_stable() -> None:
    again = ModelSpec((TensorSpec("fc.weight", (10, 64), "f32"), TensorSpec("fc.bias", (10,), "f32")))
    assert again.fingerprint == BASE.fingerprint
    assert len(BASE.fingerprint) == 16 and int(BASE.fingerprint, 16) >= 0


def test_fingerprint_of_weights_matches_explicit_spec() -> None:
    weights = {"fc.weight": np.zeros((10, 64), np.float32), "fc.bias": np.ones(10, np.float32)}
    assert ModelSpec.of(weights) == BASE
    assert ModelSpec.of(weights).fingerprint == BASE.fingerprint


@pytest.mark.parametrize(
    "other",
    [
        ModelSpec((TensorSpec("fc.weights", (10, 64)), TensorSpec("fc.bias", (10,)))),  # name
        ModelSpec((TensorSpec("fc.weight", (64, 10)), TensorSpec("fc.bias", (10,)))),  # shape
        ModelSpec((TensorSpec("fc.weight", (10, 64, 1)), TensorSpec("fc.bias", (10,)))),  # rank
        ModelSpec((TensorSpec("fc.weight", (10, 64), "f16"), TensorSpec("fc.bias", (10,)))),  # dtype
        ModelSpec((TensorSpec("fc.bias", (10,)), TensorSpec("fc.weight", (10, 64)))),  # order
        ModelSpec((TensorSpec("fc.weight", (10, 64)),)),  # a tensor less
    ],
    ids=["name", "shape", "rank", "dtype", "order", "dropped"],
)
def test_fingerprint_changes(other: ModelSpec) -> None:
    assert other.fingerprint != BASE.fingerprint


def test_sizes() -> None:
    assert BASE.num_parameters == 650
    assert BASE.nbytes == 2600
    assert nbytes("f16", (3, 5)) == 30
    assert nbytes("bf16", (4,)) == 8
    assert TensorSpec("x", ()).nbytes == 4


@pytest.mark.parametrize(
    "dtype, wire",
    [(np.float32, "f32"), (np.float16, "f16"), (np.float64, "f64"), (np.int8, "i8"), (np.uint8, "u8"), (np.int64, "i64")],
)
def test_wire_dtype_of(dtype: type, wire: str) -> None:
    assert wire_dtype_of(np.zeros(2, dtype)) == wire


@pytest.mark.parametrize("dtype", [np.bool_, np.complex64, np.uint32])
def test_wire_dtype_of_unknown(dtype: type) -> None:
    with pytest.raises(ValueError):
        wire_dtype_of(np.zeros(2, dtype))
