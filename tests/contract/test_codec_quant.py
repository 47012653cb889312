"""q8 and q4: error bounds, unbiased stochastic rounding, exact layout and strict decoding."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from fedge_contract.codecs import EncodedTensor, decode_tensor, encode_tensor, parse_chain
from fedge_contract.errors import DecodeError, Reason
from fedge_contract.tensors import TensorSpec

LEVELS = {"q8": 127, "q4": 7}
finite = st.floats(min_value=-1e4, max_value=1e4, allow_nan=False, allow_infinity=False, width=32)
arrays = hnp.arrays(np.float32, hnp.array_shapes(min_dims=1, max_dims=3, min_side=0, max_side=40), elements=finite)


def block_steps(values: np.ndarray, block: int, top: int) -> np.ndarray:
    """Each element's quantisation step: its block's max |x| / top."""
    flat = values.reshape(-1).astype(np.float64)
    steps = np.empty_like(flat)
    for start in range(0, flat.size, block):
        steps[start : start + block] = np.abs(flat[start : start + block]).max(initial=0.0) / top
    return steps.reshape(values.shape)


@settings(max_examples=80, deadline=None)
@given(arrays, st.sampled_from(["q8", "q4", "q8:7", "q4:3+zstd", "q8+lz4", "q4:1"]), st.integers(0, 2**32 - 1))
def test_round_trip_within_one_step_of_its_block(values: np.ndarray, codec: str, seed: int) -> None:
    chain = parse_chain(codec)
    encoded = encode_tensor("t", values, chain, np.random.default_rng(seed))
    decoded = decode_tensor(encoded, TensorSpec("t", values.shape))
    assert decoded.dtype == np.float32 and decoded.shape == values.shape
    step = block_steps(values, chain.value.block, LEVELS[codec[:2]])  # type: ignore[union-attr]
    error = np.abs(decoded.astype(np.float64) - values)
    assert np.all(error <= step * (1 + 1e-5) + 1e-30)
    # the largest element of each block is representable: it is rebuilt (almost) exactly
    assert np.all(np.abs(decoded) <= np.abs(values).max(initial=0) * (1 + 1e-5))


@pytest.mark.parametrize("codec", ["q8", "q4"])
def test_stochastic_rounding_is_unbiased(codec: str) -> None:
    """The mean of many encodes converges to the input: every element within a 6-sigma band.

    A round-to-nearest quantiser fails this: its error on x = (j + 0.3) steps is 0.3 steps every
    time, 30x the standard error of the mean over 2000 draws.
    """
    rng = np.random.default_rng(7)
    top = LEVELS[codec]
    values = rng.uniform(-1, 1, 512).astype(np.float32)
    values[0] = 1.0  # fix the scale: step = 1 / top for the whole block
    spec = TensorSpec("t", values.shape)
    chain = parse_chain(codec + ":512")
    draws = 2000
    total = np.zeros(values.size)
    for _ in range(draws):
        total += decode_tensor(encode_tensor("t", values, chain, rng), spec)
    mean = total / draws
    step = 1.0 / top
    sigma = step / 2 / np.sqrt(draws)  # a Bernoulli over one step has std <= step / 2
    assert np.all(np.abs(mean - values) <= 6 * sigma)
    # and it is genuinely random: values between two levels do not always land on the same one
    first = decode_tensor(encode_tensor("t", values, chain, np.random.default_rng(1)), spec)
    second = decode_tensor(encode_tensor("t", values, chain, np.random.default_rng(2)), spec)
    assert not np.array_equal(first, second)


def test_round_to_nearest_would_fail_the_unbiasedness_test() -> None:
    """Guard for the test above: its band is tight enough to catch a 0.3-step bias."""
    sigma = (1 / 127) / 2 / np.sqrt(2000)
    assert 0.3 * (1 / 127) > 6 * sigma


def test_seeded_rng_reproduces_the_bytes() -> None:
    values = np.random.default_rng(0).standard_normal(1000).astype(np.float32)
    chain = parse_chain("q4+zstd")
    a = encode_tensor("t", values, chain, np.random.default_rng(42))
    b = encode_tensor("t", values, chain, np.random.default_rng(42))
    assert a.data == b.data


@pytest.mark.parametrize(
    "codec, n, size",
    [("q8", 1000, 4 * 4 + 1000), ("q8:100", 1000, 4 * 10 + 1000), ("q4", 1000, 4 * 4 + 500), ("q4", 3, 4 + 2), ("q8", 0, 0)],
)
def test_layout_sizes(codec: str, n: int, size: int) -> None:
    encoded = encode_tensor("t", np.linspace(-1, 1, n, dtype=np.float32), parse_chain(codec))
    assert len(encoded.data) == size


def test_q4_packs_two_levels_per_byte_low_nibble_first() -> None:
    values = np.array([7.0, -7.0, 0.0], np.float32)  # scale 1: exact levels 7, -7, 0
    data = encode_tensor("t", values, parse_chain("q4")).data
    assert np.frombuffer(data[:4], "<f4")[0] == 1.0
    assert data[4:] == bytes([(7 + 8) | ((-7 + 8) << 4), (0 + 8) | (8 << 4)])


def test_zeros_and_constant_blocks_are_exact() -> None:
    values = np.concatenate([np.zeros(300), np.full(300, -0.25)]).astype(np.float32)
    for codec in ("q8", "q4"):
        decoded = decode_tensor(encode_tensor("t", values, parse_chain(codec + ":300")), TensorSpec("t", values.shape))
        np.testing.assert_array_equal(decoded, values)


# ---------------------------------------------------------------- strict decoding


def reason(data: bytes, codec: str, n: int) -> Reason:
    dtype = parse_chain(codec).wire_dtype
    with pytest.raises(DecodeError) as info:
        decode_tensor(EncodedTensor("t", dtype, (n,), codec, data), TensorSpec("t", (n,)))
    return info.value.reason


def q8_payload(scales: list[float], levels: list[int]) -> bytes:
    return np.array(scales, "<f4").tobytes() + np.array(levels, np.int8).tobytes()


def test_q8_decodes_a_hand_built_payload() -> None:
    data = q8_payload([0.5], [2, -127, 0])
    decoded = decode_tensor(EncodedTensor("t", "i8", (3,), "q8", data), TensorSpec("t", (3,)))
    np.testing.assert_array_equal(decoded, np.array([1.0, -63.5, 0.0], np.float32))


def test_q8_wrong_scale_count_is_bad_tensor() -> None:
    assert reason(q8_payload([0.5, 0.5], [1, 2, 3]), "q8", 3) is Reason.BAD_TENSOR  # one block, two scales
    assert reason(q8_payload([0.5], [1, 2, 3]), "q8:2", 3) is Reason.BAD_TENSOR  # two blocks, one scale


def test_q8_level_minus_128_is_bad_tensor() -> None:
    assert reason(q8_payload([0.5], [1, -128, 3]), "q8", 3) is Reason.BAD_TENSOR


@pytest.mark.parametrize("scale, expected", [(np.nan, Reason.NON_FINITE), (np.inf, Reason.NON_FINITE), (-1.0, Reason.BAD_TENSOR)])
def test_bad_scales(scale: float, expected: Reason) -> None:
    assert reason(q8_payload([scale], [1, 2, 3]), "q8", 3) is expected
    assert reason(np.array([scale], "<f4").tobytes() + bytes([0x99, 0x08]), "q4", 3) is expected


def test_q4_nibble_zero_and_bad_padding_are_bad_tensor() -> None:
    scale = np.array([1.0], "<f4").tobytes()
    assert reason(scale + bytes([0x09, 0x08]), "q4", 3) is Reason.BAD_TENSOR  # high nibble 0
    assert reason(scale + bytes([0x90, 0x08]), "q4", 3) is Reason.BAD_TENSOR  # low nibble 0
    assert reason(scale + bytes([0x99, 0x19]), "q4", 3) is Reason.BAD_TENSOR  # pad nibble 1
    ok = decode_tensor(EncodedTensor("t", "u8", (3,), "q4", scale + bytes([0x9F, 0x89])), TensorSpec("t", (3,)))
    np.testing.assert_array_equal(ok, np.array([7.0, 1.0, 1.0], np.float32))


def test_non_finite_input_is_refused_by_the_receiver() -> None:
    values = np.array([1.0, np.nan, 2.0], np.float32)
    for codec in ("q8", "q4", "q8+zstd"):
        encoded = encode_tensor("t", values, parse_chain(codec))
        with pytest.raises(DecodeError) as info:
            decode_tensor(encoded, TensorSpec("t", (3,)))
        assert info.value.reason is Reason.NON_FINITE


def test_q8_zstd_bomb_is_bounded_by_the_shape() -> None:
    import zstandard

    bomb = zstandard.ZstdCompressor().compress(bytes(50 << 20))
    assert reason(bomb, "q8+zstd", 1000) is Reason.BAD_TENSOR


@pytest.mark.parametrize("codec", ["q8", "q4"])
def test_a_subnormal_block_is_sent_as_zeros_not_inflated(codec: str) -> None:
    """Found by the round-trip property: a block whose scale is subnormal rebuilt values larger than its input."""
    values = np.array([1.5e-44, -7e-45, 0.0, 3e-45], dtype=np.float32)
    encoded = encode_tensor("t", values, parse_chain(codec), np.random.default_rng(0))
    decoded = decode_tensor(encoded, TensorSpec("t", values.shape))
    assert np.all(np.abs(decoded) <= np.abs(values).max())
    assert np.all(np.abs(decoded.astype(np.float64) - values) <= 1e-30)
