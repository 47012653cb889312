"""Codec chains: parsing, lossy/lossless round trips, and the strict tensor decoder."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from fedge_contract.codecs import (
    CodecError,
    EncodedTensor,
    decode_tensor,
    decode_weights,
    encode_tensor,
    encode_weights,
    parse_chain,
)
from fedge_contract.errors import DecodeError, Reason
from fedge_contract.tensors import ModelSpec, TensorSpec

# ---------------------------------------------------------------- parse_chain


@pytest.mark.parametrize(
    "text, canonical, wire_dtype, has_lossless",
    [
        ("none", "none", "f32", False),
        ("", "none", "f32", False),
        ("f16", "f16", "f16", False),
        ("bf16", "bf16", "bf16", False),
        ("zstd", "zstd", "f32", True),
        ("f16+zstd", "f16+zstd", "f16", True),
        ("bf16+zstd:5", "bf16+zstd:5", "bf16", True),
        ("  f16+zstd ", "f16+zstd", "f16", True),
    ],
)
def test_parse_chain_accepts(text: str, canonical: str, wire_dtype: str, has_lossless: bool) -> None:
    chain = parse_chain(text)
    assert str(chain) == canonical
    assert chain.wire_dtype == wire_dtype
    assert (chain.lossless is not None) is has_lossless


def test_zstd_level_is_parsed() -> None:
    assert parse_chain("bf16+zstd:5").lossless.level == 5  # type: ignore[union-attr]
    assert parse_chain("zstd").lossless.level == 3  # type: ignore[union-attr]


@pytest.mark.parametrize(
    "text",
    [
        "gzip",  # unknown stage
        "f32",
        "none+zstd",
        "f16+",
        "zstd+f16",  # lossless stage must be last
        "zstd+zstd",
        "f16+bf16",  # two casts
        "f16+f16",
        "f16:2",  # cast takes no argument
        "zstd:0",  # level out of 1..22
        "zstd:23",
        "zstd:-1",
        "zstd:fast",
        "zstd:1.5",
    ],
)
def test_parse_chain_rejects(text: str) -> None:
    with pytest.raises(CodecError):
        parse_chain(text)


# ---------------------------------------------------------------- round trips


finite_f32 = st.floats(min_value=-1e4, max_value=1e4, allow_nan=False, allow_infinity=False, width=32)
arrays = hnp.arrays(np.float32, hnp.array_shapes(min_dims=1, max_dims=3, min_side=0, max_side=12), elements=finite_f32)
ROUND_TRIP = settings(max_examples=60, deadline=None)


def round_trip(values: np.ndarray, codec: str) -> np.ndarray:
    encoded = encode_tensor("t", values, parse_chain(codec))
    assert encoded.shape == values.shape and encoded.codec == str(parse_chain(codec))
    decoded = decode_tensor(encoded, TensorSpec("t", values.shape))
    assert decoded.dtype == np.float32 and decoded.shape == values.shape
    return decoded


@ROUND_TRIP
@given(arrays, st.sampled_from(["none", "zstd", "zstd:19"]))
def test_lossless_round_trip_is_exact(values: np.ndarray, codec: str) -> None:
    decoded = round_trip(values, codec)
    assert decoded.tobytes() == values.tobytes()


@ROUND_TRIP
@given(arrays, st.sampled_from(["f16", "f16+zstd"]))
def test_f16_round_trip_within_half_an_ulp(values: np.ndarray, codec: str) -> None:
    decoded = round_trip(values, codec)
    bound = np.abs(values.astype(np.float64)) * 2.0**-11 + 2.0**-25  # 2**-25: half the f16 subnormal step
    assert np.all(np.abs(decoded.astype(np.float64) - values) <= bound)


@ROUND_TRIP
@given(arrays, st.sampled_from(["bf16", "bf16+zstd:1"]))
def test_bf16_round_trip_within_half_an_ulp(values: np.ndarray, codec: str) -> None:
    decoded = round_trip(values, codec)
    bound = np.abs(values.astype(np.float64)) * 2.0**-8 + 2.0**-134  # 2**-134: half the bf16 subnormal step
    assert np.all(np.abs(decoded.astype(np.float64) - values) <= bound)


def test_bf16_rounds_to_nearest_even() -> None:
    # 1 + 2**-8 is exactly half-way between bf16 neighbours 1 and 1 + 2**-7: ties go to the even one (1.0)
    values = np.array([1 + 2**-8, 1 + 3 * 2**-8, 1 + 2**-8 + 2**-20, -2.0], np.float32)
    np.testing.assert_array_equal(round_trip(values, "bf16"), np.array([1.0, 1 + 2**-6, 1 + 2**-7, -2.0], np.float32))


def test_f16_saturates_instead_of_overflowing() -> None:
    values = np.array([1e6, -1e6, 3.0], np.float32)
    np.testing.assert_array_equal(round_trip(values, "f16"), np.array([65504.0, -65504.0, 3.0], np.float32))


def test_encoded_sizes() -> None:
    values = np.ones((10, 10), np.float32)
    assert len(encode_tensor("t", values, parse_chain("none")).data) == 400
    assert len(encode_tensor("t", values, parse_chain("f16")).data) == 200
    assert len(encode_tensor("t", values, parse_chain("bf16")).data) == 200
    assert len(encode_tensor("t", values, parse_chain("zstd")).data) < 100


# ---------------------------------------------------------------- decode_tensor rejections


SPEC = TensorSpec("w", (2, 2))
GOOD = np.array([[1.0, 2.0], [3.0, 4.0]], np.float32)


def reason(tensor: EncodedTensor, spec: TensorSpec = SPEC) -> Reason:
    with pytest.raises(DecodeError) as info:
        decode_tensor(tensor, spec)
    return info.value.reason


def raw(data: bytes, *, dtype: str = "f32", shape: tuple[int, ...] = (2, 2), codec: str = "none") -> EncodedTensor:
    return EncodedTensor("w", dtype, shape, codec, data)


def test_decode_good_tensor() -> None:
    np.testing.assert_array_equal(decode_tensor(raw(GOOD.tobytes()), SPEC), GOOD)


@pytest.mark.parametrize("shape", [(4,), (2, 2, 1), (1, 4), ()])
def test_shape_mismatch(shape: tuple[int, ...]) -> None:
    assert reason(raw(GOOD.tobytes(), shape=shape)) is Reason.SHAPE_MISMATCH


@pytest.mark.parametrize("data", [b"", GOOD.tobytes()[:-1], GOOD.tobytes() + b"\0\0\0\0", GOOD.tobytes()[:8]])
def test_data_length_must_match_shape_and_dtype(data: bytes) -> None:
    assert reason(raw(data)) is Reason.BAD_TENSOR


def test_f16_data_length_is_checked_with_the_f16_itemsize() -> None:
    assert reason(raw(GOOD.tobytes(), dtype="f16", codec="f16")) is Reason.BAD_TENSOR  # 16 bytes, expected 8
    np.testing.assert_array_equal(decode_tensor(raw(GOOD.astype("<f2").tobytes(), dtype="f16", codec="f16"), SPEC), GOOD)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_values(bad: float) -> None:
    values = GOOD.copy()
    values[1, 0] = bad
    assert reason(raw(values.tobytes())) is Reason.NON_FINITE
    assert reason(raw(values.astype("<f2").tobytes(), dtype="f16", codec="f16")) is Reason.NON_FINITE


def test_bf16_inf_bit_pattern_is_non_finite() -> None:
    data = np.array([0x3F80, 0x7F80, 0, 0], "<u2").tobytes()  # 1.0, +inf, 0, 0
    assert reason(raw(data, dtype="bf16", codec="bf16")) is Reason.NON_FINITE


@pytest.mark.parametrize(
    "dtype, codec",
    [("f32", "f16"), ("f16", "none"), ("bf16", "f16"), ("f16", "bf16+zstd"), ("i8", "none")],
)
def test_dtype_must_match_codec(dtype: str, codec: str) -> None:
    assert reason(raw(GOOD.tobytes(), dtype=dtype, codec=codec)) is Reason.BAD_TENSOR


@pytest.mark.parametrize("codec", ["gzip", "zstd+f16", "zstd:99"])
def test_unknown_codec_on_the_wire(codec: str) -> None:
    assert reason(raw(GOOD.tobytes(), codec=codec)) is Reason.CODEC


def test_zstd_garbage_is_bad_tensor() -> None:
    assert reason(raw(b"definitely not zstd", codec="zstd")) is Reason.BAD_TENSOR
    frame = zstandard.ZstdCompressor().compress(GOOD.tobytes())
    assert reason(raw(frame[:-3], codec="zstd")) is Reason.BAD_TENSOR


def test_zstd_frame_of_the_wrong_size_is_bad_tensor() -> None:
    short = zstandard.ZstdCompressor().compress(GOOD.tobytes()[:12])
    assert reason(raw(short, codec="zstd")) is Reason.BAD_TENSOR


def test_zstd_frame_without_content_size_decodes() -> None:
    cobj = zstandard.ZstdCompressor(write_content_size=False).compressobj()
    frame = cobj.compress(GOOD.tobytes()) + cobj.flush()
    assert zstandard.frame_content_size(frame) == -1
    np.testing.assert_array_equal(decode_tensor(raw(frame, codec="zstd"), SPEC), GOOD)


def _zeros_frame(total: int, *, write_content_size: bool) -> bytes:
    """A zstd frame of ``total`` zero bytes, built chunk by chunk (never holding ``total`` bytes)."""
    cctx = zstandard.ZstdCompressor(write_content_size=write_content_size)
    cobj = cctx.compressobj(size=total) if write_content_size else cctx.compressobj()
    chunk = bytes(1 << 20)
    parts = [cobj.compress(chunk) for _ in range(total // len(chunk))]
    return b"".join(parts) + cobj.flush()


@pytest.mark.parametrize("write_content_size", [True, False], ids=["declared-size", "no-content-size"])
def test_zstd_decompression_bomb_is_refused_without_allocating(write_content_size: bool) -> None:
    total = 100 << 20
    bomb = _zeros_frame(total, write_content_size=write_content_size)
    assert len(bomb) < 64 * 1024
    assert zstandard.frame_content_size(bomb) == (total if write_content_size else -1)
    tracemalloc.start()
    try:
        assert reason(raw(bomb, codec="zstd")) is Reason.BAD_TENSOR
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20, f"decoder allocated {peak} bytes for a 16-byte tensor"


# ---------------------------------------------------------------- decode_weights


MODEL = ModelSpec((TensorSpec("a", (2,)), TensorSpec("b", (1, 3))))
WEIGHTS = {"a": np.array([1.0, -1.0], np.float32), "b": np.array([[0.5, 0.25, 0.125]], np.float32)}


def test_decode_weights_round_trip_in_spec_order() -> None:
    encoded = encode_weights({"b": WEIGHTS["b"], "a": WEIGHTS["a"]}, parse_chain("zstd"))
    decoded = decode_weights(encoded, MODEL)
    assert list(decoded) == ["a", "b"]
    for name in WEIGHTS:
        np.testing.assert_array_equal(decoded[name], WEIGHTS[name])


def weights_reason(tensors: tuple[EncodedTensor, ...]) -> DecodeError:
    with pytest.raises(DecodeError) as info:
        decode_weights(tensors, MODEL)
    return info.value


def test_decode_weights_missing_tensor() -> None:
    error = weights_reason(encode_weights({"a": WEIGHTS["a"]}, parse_chain("none")))
    assert error.reason is Reason.SHAPE_MISMATCH and "b" in error.detail


def test_decode_weights_extra_tensor() -> None:
    error = weights_reason(encode_weights({**WEIGHTS, "c": np.zeros(1, np.float32)}, parse_chain("none")))
    assert error.reason is Reason.SHAPE_MISMATCH and "'c'" in error.detail


def test_decode_weights_duplicate_tensor() -> None:
    a, b = encode_weights(WEIGHTS, parse_chain("none"))
    error = weights_reason((a, b, a))
    assert error.reason is Reason.SHAPE_MISMATCH and "twice" in error.detail


def test_decode_weights_passes_tensor_errors_through() -> None:
    values = dict(WEIGHTS, b=np.array([[0.5, np.nan, 0.0]], np.float32))
    assert weights_reason(encode_weights(values, parse_chain("none"))).reason is Reason.NON_FINITE
