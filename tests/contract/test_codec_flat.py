"""The flat layout: a whole model as one vector, split back by the receiver's own spec."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedge_contract.codecs import FLAT_NAME, CodecError, EncodedTensor, decode_weights, encode_weights, parse_chain
from fedge_contract.errors import DecodeError, Reason
from fedge_contract.tensors import ModelSpec, TensorSpec

SPEC = ModelSpec((TensorSpec("0.weight", (8, 4)), TensorSpec("0.bias", (8,)), TensorSpec("2.weight", (3, 8)), TensorSpec("2.bias", (3,))))


def delta(seed: int, spec: ModelSpec = SPEC) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {t.name: rng.standard_normal(t.shape).astype(np.float32) for t in spec.tensors}


def test_flat_is_a_layout_stage_before_the_others() -> None:
    chain = parse_chain("flat+topk:0.01+q4+zstd")
    assert chain.flat and str(chain) == "flat+topk:0.01+q4+zstd" and chain.wire_dtype == "u8"
    assert not parse_chain("topk:0.01+q4+zstd").flat
    with pytest.raises(CodecError, match="out of order"):
        parse_chain("topk:0.01+flat")
    with pytest.raises(CodecError, match="no argument"):
        parse_chain("flat:2+q8")


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 2**32 - 1), st.sampled_from(["flat", "flat+f16+zstd", "flat+topk:1+lz4"]))
def test_lossless_or_cast_round_trip_restores_every_tensor(seed: int, codec: str) -> None:
    weights = delta(seed)
    tensors = encode_weights(weights, parse_chain(codec))
    assert [t.name for t in tensors] == [FLAT_NAME] and tensors[0].shape == (SPEC.num_parameters,)
    out = decode_weights(tensors, SPEC)
    assert list(out) == list(weights)
    tolerance = 1e-3 if "f16" in codec else 0.0
    for name in weights:
        assert out[name].shape == weights[name].shape
        np.testing.assert_allclose(out[name], weights[name], rtol=tolerance, atol=tolerance)


def test_topk_is_model_wide_not_per_tensor() -> None:
    """One large layer takes the whole budget; per-tensor top-k would spend some on every tensor."""
    weights = {t.name: np.full(t.shape, 0.001, np.float32) for t in SPEC.tensors}
    weights["0.weight"] = np.arange(32, dtype=np.float32).reshape(8, 4) + 1  # every value above the rest
    k = parse_chain("topk:0.1").sparsify.count(SPEC.num_parameters)  # type: ignore[union-attr]
    out = decode_weights(encode_weights(weights, parse_chain("flat+topk:0.1")), SPEC)
    assert np.count_nonzero(out["0.weight"]) == k and not any(out[n].any() for n in ("0.bias", "2.weight", "2.bias"))
    np.testing.assert_array_equal(out["0.weight"].reshape(-1)[-k:], np.arange(32 - k, 32, dtype=np.float32) + 1)


def reject(tensors: tuple[EncodedTensor, ...], spec: ModelSpec = SPEC) -> DecodeError:
    with pytest.raises(DecodeError) as info:
        decode_weights(tensors, spec)
    return info.value


def test_flat_vector_of_another_length_is_a_shape_mismatch() -> None:
    bigger = ModelSpec((*SPEC.tensors, TensorSpec("extra", (2,))))
    tensors = encode_weights(delta(0, bigger), parse_chain("flat+q8+zstd"))
    assert reject(tensors).reason is Reason.SHAPE_MISMATCH


def test_star_tensor_needs_a_flat_codec() -> None:
    tensors = encode_weights({FLAT_NAME: np.zeros(SPEC.num_parameters, np.float32)}, parse_chain("q8"))
    assert reject(tensors).reason is Reason.CODEC


def test_flat_codec_on_a_named_tensor_is_refused() -> None:
    (flat,) = encode_weights(delta(0), parse_chain("flat+q8"))
    named = tuple(EncodedTensor(t.name, flat.dtype, t.shape, flat.codec, b"") for t in SPEC.tensors)
    assert reject(named).reason is Reason.CODEC


def test_flat_beside_named_tensors_is_refused() -> None:
    (flat,) = encode_weights(delta(0), parse_chain("flat+q8"))
    per_tensor = encode_weights(delta(0), parse_chain("q8"))
    assert reject((flat, *per_tensor[1:])).reason is Reason.SHAPE_MISMATCH  # '*' is not part of the model


def test_flat_needs_a_float32_model() -> None:
    ints = ModelSpec((TensorSpec("steps", (1,), "i64"), TensorSpec("w", (3,))))
    tensors = encode_weights({"steps": np.zeros(1, np.float32), "w": np.zeros(3, np.float32)}, parse_chain("flat+q8"))
    assert reject(tensors, ints).reason is Reason.CODEC
    with pytest.raises(CodecError, match="floating-point"):
        encode_weights({"steps": np.zeros(1, np.int64)}, parse_chain("flat+q8"))


def test_flat_saves_the_per_tensor_framing() -> None:
    weights = delta(3)
    per_tensor = sum(len(t.data) + len(t.name) + len(t.codec) for t in encode_weights(weights, parse_chain("topk:0.1+q8+zstd")))
    (flat,) = encode_weights(weights, parse_chain("flat+topk:0.1+q8+zstd"))
    assert len(flat.data) + len(flat.name) + len(flat.codec) < per_tensor
