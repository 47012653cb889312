"""sign[:block]: one bit per value and a mean magnitude per block; strict decoding."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from fedge_contract.codecs import CodecError, EncodedTensor, decode_tensor, encode_tensor, parse_chain
from fedge_contract.errors import DecodeError, Reason
from fedge_contract.tensors import TensorSpec

finite = st.floats(allow_nan=False, allow_infinity=False, width=32)
arrays = hnp.arrays(np.float32, hnp.array_shapes(min_dims=1, max_dims=2, min_side=0, max_side=200), elements=finite)


@settings(max_examples=100, deadline=None)
@given(arrays, st.sampled_from(["sign", "sign:7", "sign:1", "topk:0.1+rice+sign+zstd"]))
def test_each_value_is_its_sign_times_its_blocks_mean_magnitude(values: np.ndarray, codec: str) -> None:
    chain = parse_chain(codec)
    tensor = encode_tensor("t", values, chain)
    assert tensor.dtype == "u8"
    decoded = decode_tensor(tensor, TensorSpec("t", values.shape)).reshape(-1)
    flat = values.reshape(-1)
    kept = chain.sparsify.select(flat) if chain.sparsify else np.arange(flat.size)
    assert np.count_nonzero(decoded[np.setdiff1d(np.arange(flat.size), kept)]) == 0
    block = chain.value.block  # type: ignore[union-attr]
    for start in range(0, kept.size, block):
        chosen = kept[start : start + block]
        scale = np.float32(np.abs(flat[chosen].astype(np.float64)).mean())
        assert np.array_equal(np.abs(decoded[chosen]), np.full(chosen.size, scale, np.float32))
        assert np.array_equal(np.signbit(decoded[chosen]), np.signbit(flat[chosen]))  # -0.0 keeps its sign too


def test_sizes_and_the_layout_by_hand() -> None:
    chain = parse_chain("sign:4")
    assert chain.stored_nbytes(10) == 3 * 4 + 2
    data = encode_tensor("t", np.array([1, -3, 2, -2, 5, 5, -5, -5, 0.5, -0.5], np.float32), chain).data
    assert np.frombuffer(data[:12], "<f4").tolist() == [2.0, 5.0, 0.5]
    assert data[12:] == bytes([0b01010011, 0b01000000])
    with pytest.raises(CodecError):
        parse_chain("sign:0")


@pytest.mark.parametrize("scales, bits, reason", [
    ([-1.0], bytes([0]), Reason.BAD_TENSOR),
    ([float("nan")], bytes([0]), Reason.NON_FINITE),
    ([float("inf")], bytes([0]), Reason.NON_FINITE),
    ([1.0], bytes([0b00000001]), Reason.BAD_TENSOR),  # a 1 pad bit after 7 values
])
def test_malformed_payloads_are_refused(scales: list[float], bits: bytes, reason: Reason) -> None:
    data = np.array(scales, "<f4").tobytes() + bits
    with pytest.raises(DecodeError) as caught:
        decode_tensor(EncodedTensor("t", "u8", (7,), "sign", data), TensorSpec("t", (7,)))
    assert caught.value.reason is reason


def test_a_non_finite_input_travels_as_a_non_finite_scale_and_is_refused() -> None:
    tensor = encode_tensor("t", np.array([1.0, np.nan], np.float32), parse_chain("sign"))
    with pytest.raises(DecodeError) as caught:
        decode_tensor(tensor, TensorSpec("t", (2,)))
    assert caught.value.reason is Reason.NON_FINITE
