"""topk:<fraction>: exact kept coordinates, the right ones kept, strict index validation."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from fedge_contract.codec_stages.topk import fraction_text, index_dtype
from fedge_contract.codecs import EncodedTensor, decode_tensor, encode_tensor, parse_chain
from fedge_contract.errors import DecodeError, Reason
from fedge_contract.tensors import TensorSpec

finite = st.floats(min_value=-1e4, max_value=1e4, allow_nan=False, allow_infinity=False, width=32)
arrays = hnp.arrays(np.float32, hnp.array_shapes(min_dims=1, max_dims=2, min_side=0, max_side=300), elements=finite)
fractions = st.sampled_from(["0.001", "0.01", "0.1", "0.33", "0.5", "1"])


def expected_k(fraction: str, n: int) -> int:
    return 0 if n == 0 else min(n, max(1, math.ceil(float(fraction) * n)))


@settings(max_examples=80, deadline=None)
@given(arrays, fractions, st.sampled_from(["", "+zstd", "+lz4"]))
def test_kept_coordinates_are_exact_and_the_largest(values: np.ndarray, fraction: str, lossless: str) -> None:
    chain = parse_chain(f"topk:{fraction}{lossless}")
    decoded = decode_tensor(encode_tensor("t", values, chain), TensorSpec("t", values.shape))
    assert decoded.dtype == np.float32 and decoded.shape == values.shape
    flat, out = values.reshape(-1), decoded.reshape(-1)
    k = expected_k(fraction, flat.size)
    kept = out != 0
    # every coordinate is either rebuilt exactly or zero, and at most k are non-zero
    assert np.all((out == flat) | ~kept) and kept.sum() <= k
    # no dropped coordinate is larger in magnitude than a kept one
    if k < flat.size and kept.any():
        assert np.abs(flat[~kept]).max(initial=0) <= np.abs(out[kept]).min()
    # exactly k positions travelled (zeros among the top k decode as zeros, which is exact)
    assert chain.stored_nbytes(flat.size) == k * (index_dtype(flat.size).itemsize + 4)


@settings(max_examples=60, deadline=None)
@given(arrays, fractions, st.sampled_from(["q8", "q4", "f16"]), st.integers(0, 2**32 - 1))
def test_kept_coordinates_go_through_the_value_stage(values: np.ndarray, fraction: str, value: str, seed: int) -> None:
    chain = parse_chain(f"topk:{fraction}+{value}+zstd")
    decoded = decode_tensor(encode_tensor("t", values, chain, np.random.default_rng(seed)), TensorSpec("t", values.shape))
    flat, out = values.reshape(-1).astype(np.float64), decoded.reshape(-1)
    k = expected_k(fraction, flat.size)
    assert np.count_nonzero(out) <= k
    kept_max = np.sort(np.abs(flat))[::-1][:k]
    if k:
        # a kept value is off by at most one quantisation step of the largest kept value
        step = {"q8": kept_max[0] / 127, "q4": kept_max[0] / 7, "f16": kept_max[0] * 2**-10 + 2**-24}[value]
        rebuilt = out != 0
        assert np.all(np.abs(out[rebuilt] - flat[rebuilt]) <= step * (1 + 1e-5) + 1e-30)


def test_counts_and_index_widths() -> None:
    chain = parse_chain("topk:0.01")
    assert [chain.sparsify.count(n) for n in (0, 1, 50, 100, 101, 8192)] == [0, 1, 1, 1, 2, 82]  # type: ignore[union-attr]
    assert [index_dtype(n).itemsize for n in (1, 256, 257, 65536, 65537)] == [1, 1, 2, 2, 4]


def test_positions_travel_as_gaps() -> None:
    values = np.zeros(1000, np.float32)
    values[[5, 6, 900]] = [1.0, 2.0, 3.0]
    data = encode_tensor("t", values, parse_chain("topk:0.003")).data  # k = 3, u16 gaps then f32 values
    assert list(data[:6]) == [5, 1, 894 & 0xFF, 0, 0, 894 >> 8]  # byte-planar: the low bytes, then the high bytes
    assert planar_gaps([5, 1, 894], 1000) == data[:6]
    assert np.frombuffer(data[6:], "<f4").tolist() == [1.0, 2.0, 3.0]


def planar_gaps(gaps: list[int], n: int) -> bytes:
    """Gaps as topk stores them: byte-planar, low bytes first (built independently of the codec)."""
    width = index_dtype(n).itemsize
    return bytes((g >> (8 * plane)) & 0xFF for plane in range(width) for g in gaps)


# ---------------------------------------------------------------- strict decoding


def reason(gaps: list[int], n: int, codec: str = "topk:0.003", values: list[float] | None = None) -> Reason:
    k = parse_chain(codec).sparsify.count(n)  # type: ignore[union-attr]
    data = planar_gaps(gaps, n) + np.array(values or [1.0] * k, "<f4").tobytes()
    with pytest.raises(DecodeError) as info:
        decode_tensor(EncodedTensor("t", "f32", (n,), codec, data), TensorSpec("t", (n,)))
    return info.value.reason


def test_duplicate_position_is_bad_tensor() -> None:
    assert reason([5, 0, 10], 1000) is Reason.BAD_TENSOR


def test_position_past_the_end_is_bad_tensor() -> None:
    assert reason([5, 1, 994], 1000) is Reason.BAD_TENSOR  # 5, 6, 1000: one past the end
    assert reason([65535, 65535, 65535], 1000) is Reason.BAD_TENSOR  # u16 sums must not wrap around


def test_first_position_past_the_end_is_bad_tensor() -> None:
    assert reason([200], 200, codec="topk:0.001") is Reason.BAD_TENSOR


def test_wrong_number_of_positions_is_bad_tensor() -> None:
    assert reason([5, 1], 1000) is Reason.BAD_TENSOR  # k = 3 for 1000 elements
    assert reason([5, 1, 2, 3], 1000) is Reason.BAD_TENSOR


def test_non_finite_kept_value_is_non_finite() -> None:
    assert reason([5, 1, 3], 1000, values=[1.0, float("nan"), 2.0]) is Reason.NON_FINITE


def test_valid_hand_built_payload_decodes() -> None:
    data = planar_gaps([0, 2, 997], 1000) + np.array([1.0, -1.0, 4.0], "<f4").tobytes()
    decoded = decode_tensor(EncodedTensor("t", "f32", (1000,), "topk:0.003", data), TensorSpec("t", (1000,)))
    assert decoded[[0, 2, 999]].tolist() == [1.0, -1.0, 4.0] and np.count_nonzero(decoded) == 3


def test_sparse_zstd_bomb_is_bounded_by_k() -> None:
    import zstandard

    bomb = zstandard.ZstdCompressor().compress(bytes(20 << 20))
    with pytest.raises(DecodeError) as info:
        decode_tensor(EncodedTensor("t", "i8", (1000, 1000), "topk:0.001+q8+zstd", bomb), TensorSpec("t", (1000, 1000)))
    assert info.value.reason is Reason.BAD_TENSOR


def test_nan_input_is_kept_so_the_receiver_refuses_it() -> None:
    values = np.arange(100, dtype=np.float32)
    values[3] = np.nan
    encoded = encode_tensor("t", values, parse_chain("topk:0.01"))
    with pytest.raises(DecodeError) as info:
        decode_tensor(encoded, TensorSpec("t", (100,)))
    assert info.value.reason is Reason.NON_FINITE


@settings(max_examples=500, deadline=None)
@given(st.integers(1, 10**9).flatmap(lambda n: st.tuples(st.just(n), st.integers(1, n))))
def test_a_fraction_text_keeps_exactly_the_count_it_was_made_for(n_k: tuple[int, int]) -> None:
    """The broadcast encoder lowers a top-k fraction to a vector's nonzero count (codecs.fitted_to): the text it
    writes must parse and keep exactly that many, whatever floating point does to fraction x n."""
    n, k = n_k
    text = fraction_text(k, n)
    assert text is not None and len(text) <= 16
    assert parse_chain(f"topk:{text}").sparsify.count(n) == k  # type: ignore[union-attr]
