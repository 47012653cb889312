"""The model a device holds: its hash, and the one rebuild step both sides run.

Server and devices must hold the same model bit for bit, or a device's update would be a delta
against a model the aggregator never folds against. So both advance it with the same two
functions and nothing else: ``apply_delta`` (decode with the contract's one decoder, then add in
float32, element by element) and ``decode_full`` (a keyframe's tensors, decoded). Every operation
on that path is an IEEE 754 float32 add, multiply or conversion of single elements (the codec
stages' decoders scale int8/nibble levels by per-block scales, widen f16/bf16, scatter top-k
values); there is no sum, dot product or BLAS call whose result could depend on the CPU's vector
width or the library's blocking. Such arithmetic is correctly rounded on every IEEE machine, so
both sides get the same bits unless one of them flushes subnormals to zero (a non-default CPU
mode): the hash then differs and the device refetches.

The hash (``held_digest``) covers exactly: the 14 bytes ``b"fedge-held-v1\\0"``, the 16 ASCII
characters of the model's fingerprint (names, shapes, dtypes), then every tensor in the spec's
order (the model's state-dict order, the order of the fingerprint) as C-order little-endian
float32 bytes. Bytes, not values: ``-0.0`` and ``0.0`` differ. It is SHA-256 (1.6 GB/s with the
CPU's SHA instructions here), truncated to HELD_HASH_BYTES: integrity against bugs and corrupt
storage, not against forgery (only the aggregator may publish under ``global``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

import numpy as np

from fedge_contract.codecs import EncodedTensor, decode_weights
from fedge_contract.errors import DecodeError, Reason
from fedge_contract.messages import HELD_HASH_BYTES
from fedge_contract.tensors import ModelSpec

__all__ = ["HELD_HASH_BYTES", "Weights", "apply_delta", "check_spec", "decode_full", "held_digest", "join_weights", "split_weights"]

Weights = dict[str, np.ndarray]
_TAG = b"fedge-held-v1\0"


def check_spec(spec: ModelSpec) -> None:
    """Delta broadcasts need a model of float32 tensors (the flat codecs and the hash assume it)."""
    others = [t.name for t in spec.tensors if t.dtype != "f32"]
    if others:
        raise ValueError(f"delta broadcasts need float32 tensors only; these are not: {', '.join(others[:5])}")


def held_digest(weights: Mapping[str, np.ndarray], spec: ModelSpec) -> bytes:
    """The digest of a held model (see the module docstring for exactly what it covers)."""
    hasher = hashlib.sha256(_TAG + spec.fingerprint.encode("ascii"))
    for t in spec.tensors:
        values = weights[t.name]
        if values.dtype != np.float32 or values.shape != t.shape:
            raise ValueError(f"tensor {t.name!r} is {values.dtype} {values.shape}, the spec says float32 {t.shape}")
        hasher.update(np.ascontiguousarray(values, dtype="<f4").data)
    return hasher.digest()[:HELD_HASH_BYTES]


def apply_delta(held: Mapping[str, np.ndarray], tensors: tuple[EncodedTensor, ...], spec: ModelSpec) -> Weights:
    """``held + decode(tensors)`` in float32, element by element: a new model, ``held`` untouched.

    Raises DecodeError for a delta that does not decode against ``spec``, and NON_FINITE when the
    sum overflows (a decoded delta is finite, but a huge one could carry a weight to inf).
    """
    delta = decode_weights(tensors, spec)
    with np.errstate(over="ignore"):  # an overflow is refused just below, with a reason
        out = {t.name: np.add(held[t.name], delta[t.name], dtype=np.float32) for t in spec.tensors}
    _check_finite(out, "the model rebuilt from this delta")
    return out


def decode_full(tensors: tuple[EncodedTensor, ...], spec: ModelSpec) -> Weights:
    """A full model (a keyframe) as held: the decoder's float32 arrays, in the spec's order."""
    weights = decode_weights(tensors, spec)
    return {t.name: np.ascontiguousarray(weights[t.name], dtype=np.float32) for t in spec.tensors}


def _check_finite(weights: Mapping[str, np.ndarray], what: str) -> None:
    for name, values in weights.items():
        if not np.isfinite(values).all():
            raise DecodeError(Reason.NON_FINITE, f"{what}: tensor {name!r} holds NaN or Inf")


def join_weights(weights: Mapping[str, np.ndarray], spec: ModelSpec) -> bytes:
    """Every tensor as little-endian float32, in the spec's order: the bytes ``held_digest`` covers."""
    return b"".join(np.ascontiguousarray(weights[t.name], dtype="<f4").tobytes() for t in spec.tensors)


def split_weights(blob: bytes, spec: ModelSpec, where: str) -> Weights:
    """Inverse of ``join_weights``; the length must be exactly the spec's (checked before any copy)."""
    if len(blob) != spec.nbytes:
        raise DecodeError(Reason.BAD_TENSOR, f"{where}: {len(blob)} bytes of weights, the model has {spec.nbytes}")
    out: Weights = {}
    offset = 0
    for t in spec.tensors:
        out[t.name] = np.frombuffer(blob, dtype="<f4", count=t.nbytes // 4, offset=offset).astype(np.float32).reshape(t.shape)
        offset += t.nbytes
    _check_finite(out, where)
    return out
