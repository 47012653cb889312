"""The chain grammar with sparsify < value < lossless stages, and lz4 as a lossless last stage."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from fedge_contract.codecs import CodecError, EncodedTensor, decode_tensor, encode_tensor, parse_chain
from fedge_contract.errors import DecodeError, Reason
from fedge_contract.tensors import TensorSpec


@pytest.mark.parametrize(
    "text, canonical, wire_dtype",
    [
        ("q8", "q8", "i8"),
        ("q4", "q4", "u8"),
        ("q8:128", "q8:128", "i8"),
        ("q4:256", "q4:256", "u8"),  # the default block is written as given
        ("lz4", "lz4", "f32"),
        ("zstd:3", "zstd", "f32"),  # the default level is canonically implicit
        ("topk:0.01", "topk:0.01", "f32"),
        ("topk:0.01+q8+zstd", "topk:0.01+q8+zstd", "i8"),
        ("topk:1+f16+lz4", "topk:1+f16+lz4", "f16"),
        ("topk:0.1+bf16", "topk:0.1+bf16", "bf16"),
        ("topk:0.5+zstd:19", "topk:0.5+zstd:19", "f32"),
        ("q4+lz4", "q4+lz4", "u8"),
    ],
)
def test_parse_accepts(text: str, canonical: str, wire_dtype: str) -> None:
    chain = parse_chain(text)
    assert str(chain) == canonical and chain.wire_dtype == wire_dtype
    assert str(parse_chain(str(chain))) == canonical  # canonical text is a fixed point


@pytest.mark.parametrize(
    "text, words",
    [
        ("q8+topk:0.1", "out of order"),
        ("zstd+topk:0.1", "out of order"),
        ("lz4+q8", "out of order"),
        ("zstd+lz4", "at most one lossless"),
        ("q8+q4", "at most one value"),
        ("f16+q8", "at most one value"),
        ("topk:0.1+topk:0.2", "at most one sparsify"),
        ("topk", "fraction"),
        ("topk:0", "fraction"),
        ("topk:-0.1", "fraction"),
        ("topk:1.5", "fraction"),
        ("topk:nan", "fraction"),
        ("topk:inf", "fraction"),
        ("topk:abc", "fraction"),
        ("q8:0", "block"),
        ("q8:-1", "block"),
        ("q4:x", "block"),
        ("q8:99999999999", "block"),
        ("lz4:1", "no argument"),
        ("q16", "unknown stage"),
        ("randk:0.1", "unknown stage"),
    ],
)
def test_parse_rejects_with_a_clear_message(text: str, words: str) -> None:
    with pytest.raises(CodecError, match=words):
        parse_chain(text)


@settings(max_examples=60, deadline=None)
@given(hnp.arrays(np.float32, st.integers(0, 3000), elements=st.floats(-1e4, 1e4, width=32)), st.sampled_from(["lz4", "topk:1+lz4"]))
def test_lz4_round_trip_is_exact(values: np.ndarray, codec: str) -> None:
    encoded = encode_tensor("t", values, parse_chain(codec))
    decoded = decode_tensor(encoded, TensorSpec("t", values.shape))
    assert decoded.dtype == np.float32 and decoded.tobytes() == values.astype(np.float32).tobytes()


def lz4_reason(data: bytes, shape: tuple[int, ...] = (4,)) -> Reason:
    with pytest.raises(DecodeError) as info:
        decode_tensor(EncodedTensor("t", "f32", shape, "lz4", data), TensorSpec("t", shape))
    return info.value.reason


def test_lz4_garbage_and_wrong_sizes_are_bad_tensor() -> None:
    good = encode_tensor("t", np.arange(4, dtype=np.float32), parse_chain("lz4")).data
    assert lz4_reason(b"\xff\xff\xff garbage") is Reason.BAD_TENSOR
    assert lz4_reason(good[:-2]) is Reason.BAD_TENSOR
    short = encode_tensor("t", np.arange(3, dtype=np.float32), parse_chain("lz4")).data
    assert lz4_reason(short) is Reason.BAD_TENSOR  # 12 bytes where the shape needs 16


def test_lz4_bomb_is_refused() -> None:
    import lz4.block

    bomb = lz4.block.compress(bytes(100 << 20), store_size=False)  # 100 MiB of zeros in ~400 KiB
    assert lz4_reason(bomb) is Reason.BAD_TENSOR  # the output buffer is 16 bytes: it cannot grow


def test_small_sparse_tensor_is_small() -> None:
    values = np.zeros(8192, np.float32)
    values[[3, 700, 4000]] = [1.0, -2.0, 3.0]
    encoded = encode_tensor("t", values, parse_chain("topk:0.001+q8"))  # k = 9: 9 u16 gaps + 1 scale + 9 levels
    assert len(encoded.data) == 9 * 2 + 4 + 9
