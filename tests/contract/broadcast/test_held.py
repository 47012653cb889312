"""The held model's hash covers exactly what its docstring says; the rebuild step is a float32 add."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from fedge_contract.broadcast import HELD_HASH_BYTES, apply_delta, decode_full, held_digest
from fedge_contract.broadcast.held import check_spec, join_weights, split_weights
from fedge_contract.codecs import encode_weights, parse_chain
from fedge_contract.errors import DecodeError, Reason
from fedge_contract.tensors import ModelSpec, TensorSpec
from tests.contract.broadcast.helpers import SPEC, initial, same_bits


def test_digest_is_sha256_of_tag_fingerprint_and_little_endian_tensors_in_spec_order() -> None:
    weights = initial()
    body = b"".join(weights[t.name].astype("<f4").tobytes() for t in SPEC.tensors)
    expected = hashlib.sha256(b"fedge-held-v1\0" + SPEC.fingerprint.encode() + body).digest()[:HELD_HASH_BYTES]
    assert held_digest(weights, SPEC) == expected
    assert join_weights(weights, SPEC) == body


def test_digest_sees_every_bit_the_order_and_the_architecture() -> None:
    weights = initial()
    base = held_digest(weights, SPEC)
    zero = {**weights, "layer.bias": np.zeros(12, np.float32)}
    negative_zero = {**weights, "layer.bias": -np.zeros(12, np.float32)}
    assert held_digest(zero, SPEC) != held_digest(negative_zero, SPEC)  # bytes, not values
    flipped = {k: v.copy() for k, v in weights.items()}
    flipped["head.weight"].view(np.uint32)[1, 2] ^= 1  # one mantissa bit
    assert held_digest(flipped, SPEC) != base
    reordered = ModelSpec(tuple(reversed(SPEC.tensors)))
    assert held_digest(weights, reordered) != base
    with pytest.raises(ValueError, match="float32"):
        held_digest({**weights, "layer.bias": weights["layer.bias"].astype(np.float64)}, SPEC)


def test_apply_delta_is_the_elementwise_float32_sum_of_the_decoded_delta() -> None:
    held, rng = initial(), np.random.default_rng(1)
    delta = {t.name: (rng.standard_normal(t.shape) * 1e-3).astype(np.float32) for t in SPEC.tensors}
    for chain in ("none", "flat+q8+zstd", "topk:0.2+q4", "flat+topk:0.1+bf16+lz4"):
        tensors = encode_weights(delta, parse_chain(chain), np.random.default_rng(0))
        out = apply_delta(held, tensors, SPEC)
        decoded = decode_full(tensors, SPEC)
        assert same_bits(out, {k: (held[k] + decoded[k]).astype(np.float32) for k in held})
        assert same_bits(held, initial())  # the held model it started from is untouched


def test_apply_delta_refuses_a_sum_that_overflows() -> None:
    held = {**initial(), "layer.bias": np.full(12, 3e38, np.float32)}
    tensors = encode_weights({t.name: np.full(t.shape, 3e38, np.float32) for t in SPEC.tensors}, parse_chain("none"))
    with pytest.raises(DecodeError) as caught:
        apply_delta(held, tensors, SPEC)
    assert caught.value.reason is Reason.NON_FINITE


def test_split_inverts_join_and_checks_the_length_first() -> None:
    weights = initial()
    assert same_bits(split_weights(join_weights(weights, SPEC), SPEC, "state"), weights)
    with pytest.raises(DecodeError) as caught:
        split_weights(join_weights(weights, SPEC)[:-4], SPEC, "state")
    assert caught.value.reason is Reason.BAD_TENSOR
    nan = {**weights, "layer.bias": np.full(12, np.nan, np.float32)}
    with pytest.raises(DecodeError) as caught:
        split_weights(join_weights(nan, SPEC), SPEC, "state")
    assert caught.value.reason is Reason.NON_FINITE


def test_only_float32_models_broadcast_deltas() -> None:
    with pytest.raises(ValueError, match="float32"):
        check_spec(ModelSpec((TensorSpec("w", (2,)), TensorSpec("steps", (1,), "i64"))))
