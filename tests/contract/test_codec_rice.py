"""rice: top-k positions Rice-coded: exact round trips, near their entropy, bounded and strict decoding."""

from __future__ import annotations

import math

import numpy as np
import pytest
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from fedge_contract.codec_stages.rice import MAX_PARAMETER, max_parameter, rice_bounds, rice_decode, rice_encode
from fedge_contract.codecs import CodecError, EncodedTensor, decode_tensor, encode_tensor, parse_chain
from fedge_contract.errors import DecodeError, Reason
from fedge_contract.tensors import TensorSpec

finite = st.floats(min_value=-1e4, max_value=1e4, allow_nan=False, allow_infinity=False, width=32)
arrays = hnp.arrays(np.float32, hnp.array_shapes(min_dims=1, max_dims=2, min_side=0, max_side=300), elements=finite)
fractions = st.sampled_from(["0.001", "0.01", "0.05", "0.33", "1"])


@st.composite
def position_sets(draw: st.DrawFn) -> tuple[np.ndarray, int]:
    n = draw(st.integers(1, 5000))
    chosen = draw(st.sets(st.integers(0, n - 1), min_size=1, max_size=min(n, 400)))
    return np.array(sorted(chosen), np.int64), n


@settings(max_examples=200, deadline=None)
@given(position_sets())
def test_any_position_set_round_trips_within_its_bounds(case: tuple[np.ndarray, int]) -> None:
    positions, n = case
    data = rice_encode(positions)
    low, high = rice_bounds(n, positions.size)
    assert low <= len(data) <= high and data[0] <= max_parameter(n, positions.size)
    assert rice_decode(memoryview(data), n, positions.size, "t").tolist() == positions.tolist()


@settings(max_examples=80, deadline=None)
@given(arrays, fractions, st.sampled_from(["", "+q4", "+q8+zstd", "+f16+lz4", "+sign"]), st.integers(0, 2**32 - 1))
def test_rice_changes_the_bytes_not_what_is_rebuilt(values: np.ndarray, fraction: str, rest: str, seed: int) -> None:
    plain, rice = parse_chain(f"topk:{fraction}{rest}"), parse_chain(f"topk:{fraction}+rice{rest}")
    spec = TensorSpec("t", values.shape)
    a = decode_tensor(encode_tensor("t", values, plain, np.random.default_rng(seed)), spec)
    b = decode_tensor(encode_tensor("t", values, rice, np.random.default_rng(seed)), spec)
    assert a.tobytes() == b.tobytes()


def test_the_chain_text_and_its_rules() -> None:
    assert str(parse_chain("flat+topk:0.01+rice+q4")) == "flat+topk:0.01+rice+q4"
    for bad in ("rice+q4", "flat+rice", "topk:0.01+q4+rice", "topk:0.01+rice:3", "topk:0.01+rice+rice"):
        with pytest.raises(CodecError):
            parse_chain(bad)


def test_near_the_entropy_of_the_positions_where_zstd_of_gaps_is_not() -> None:
    """Uniform positions (what top-k of a heavy-tailed delta looks like) at the digits model's size."""
    rng = np.random.default_rng(0)
    n = 9610
    for fraction in (0.01, 0.03, 0.05, 0.2):
        k = math.ceil(fraction * n)
        positions = np.sort(rng.choice(n, k, replace=False)).astype(np.int64)
        entropy = (math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)) / math.log(2) / 8
        rice = len(rice_encode(positions))
        planar_zstd = len(zstandard.ZstdCompressor().compress(parse_chain(f"topk:{fraction}").sparsify.encode_indices(positions, n)))  # type: ignore[union-attr]
        assert rice <= entropy * 1.06 + 2 and rice < planar_zstd, (fraction, rice, entropy, planar_zstd)


def test_the_layout_by_hand() -> None:
    # positions 1, 2, 9 of 16: gaps 1, 0, 6; b = 1: remainders 1, 0, 0 -> 0b100 (pad to 0b10000000),
    # quotients 0, 0, 3 -> unary 1 1 0001 -> 0b11000100
    data = rice_encode(np.array([1, 2, 9]))
    assert data == bytes([1, 0b10000000, 0b11000100])
    assert rice_decode(memoryview(data), 16, 3, "t").tolist() == [1, 2, 9]


# ---------------------------------------------------------------- strict decoding


def refusal(data: bytes, n: int = 16, k: int = 3) -> str:
    with pytest.raises(DecodeError) as caught:
        rice_decode(memoryview(data), n, k, "t")
    assert caught.value.reason is Reason.BAD_TENSOR
    return caught.value.detail


@pytest.mark.parametrize("data, says", [
    (b"", "parameter byte"),
    (bytes([MAX_PARAMETER + 1, 0, 0]), "above"),
    (bytes([5, 0, 0, 0]), "above 4"),  # gaps of 3 of 16 positions are at most 13: 4 bits
    (bytes([1, 0b10000000]), "cannot hold"),  # no unary stream at all
    (bytes([1, 0b10000000, 0b11000100, 0, 0]), "cannot hold"),  # longer than 16 positions allow with b = 1
    (bytes([1, 0b10000000, 0b11000000]), "hold 2 gaps"),  # a terminator missing
    (bytes([1, 0b10000000, 0b11110000]), "hold 4 gaps"),  # one too many
    (bytes([1, 0b10000001, 0b11000100]), "padded with 1"),
    (bytes([0, 0b11100000, 0]), "whole byte of padding"),
])
def test_malformed_sections_are_refused_with_a_reason(data: bytes, says: str) -> None:
    assert says in refusal(data)


def test_positions_past_the_end_are_refused() -> None:
    # b = 1, remainders 1, 0, 0, quotients 0, 0, 1: gaps 1, 0, 2, positions 1, 2, 5
    data = bytes([1, 0b10000000, 0b11010000])
    assert rice_decode(memoryview(data), 6, 3, "t").tolist() == [1, 2, 5]
    assert "past the end" in refusal(data, n=5)
    # b = 0, quotients 13, 0, 0: positions 13, 14, 15 (the last ones of 16), one past the end of 15
    data = bytes([0, 0, 0b00000111])
    assert rice_decode(memoryview(data), 16, 3, "t").tolist() == [13, 14, 15]
    assert "past the end" in refusal(data, n=15)


def test_no_positions() -> None:
    assert rice_encode(np.zeros(0, np.int64)) == bytes([0])
    assert rice_decode(memoryview(bytes([0])), 0, 0, "t").size == 0
    assert "above 0" in refusal(bytes([3]), n=0, k=0)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=64), st.integers(1, 4000), st.integers(1, 60))
def test_random_bytes_decode_or_are_refused_never_anything_else(data: bytes, n: int, k: int) -> None:
    k = min(k, n)
    try:
        positions = rice_decode(memoryview(data), n, k, "t")
    except DecodeError as exc:
        assert exc.reason is Reason.BAD_TENSOR
        return
    assert positions.size == k and positions[0] >= 0 and positions[-1] < n and (np.diff(positions) > 0).all()
    assert len(data) <= rice_bounds(n, k)[1]


@settings(max_examples=100, deadline=None)
@given(st.binary(min_size=1, max_size=300), st.sampled_from(["topk:0.05+rice+q4", "topk:0.05+rice+q4+zstd", "topk:0.1+rice"]))
def test_hostile_tensors_decode_or_are_refused(data: bytes, codec: str) -> None:
    chain = parse_chain(codec)
    try:
        values = decode_tensor(EncodedTensor("t", chain.wire_dtype, (1000,), codec, data), TensorSpec("t", (1000,)))
    except DecodeError:
        return
    assert values.shape == (1000,) and np.count_nonzero(values) <= 50 * (2 if "0.1" in codec else 1)


def test_a_zstd_bomb_stops_at_the_bound() -> None:
    codec = "topk:0.01+rice+q4+zstd"
    low, high = parse_chain(codec).stored_bounds(10_000)
    assert low < high
    bomb = zstandard.ZstdCompressor().compress(b"\0" * (high + 1))
    with pytest.raises(DecodeError) as caught:
        decode_tensor(EncodedTensor("t", "u8", (10_000,), codec, bomb), TensorSpec("t", (10_000,)))
    assert caught.value.reason is Reason.BAD_TENSOR
