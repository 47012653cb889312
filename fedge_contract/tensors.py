"""Tensors on the wire: dtype names, model specs and their fingerprint.

A tensor travels as raw little-endian bytes with its wire dtype name and shape; never as a list
of numbers and never through pickle. ``bf16`` has no numpy dtype: it travels as the upper 16 bits
of a float32 and is widened back on decode.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

# wire name -> numpy dtype of one stored element (bf16 is stored as uint16)
WIRE_DTYPES: dict[str, np.dtype] = {
    "f32": np.dtype("<f4"),
    "f16": np.dtype("<f2"),
    "bf16": np.dtype("<u2"),
    "f64": np.dtype("<f8"),
    "i8": np.dtype("i1"),
    "u8": np.dtype("u1"),
    "i16": np.dtype("<i2"),
    "i32": np.dtype("<i4"),
    "i64": np.dtype("<i8"),
}

MAX_RANK = 8


def wire_dtype_of(array: np.ndarray) -> str:
    """The wire name of a numpy array's dtype (``bf16`` is never inferred: it has no numpy dtype)."""
    for name, wire in WIRE_DTYPES.items():
        if name != "bf16" and array.dtype.kind == wire.kind and array.dtype.itemsize == wire.itemsize:
            return name
    raise ValueError(f"dtype {array.dtype} has no wire name")


def element_count(shape: tuple[int, ...]) -> int:
    return math.prod(shape)


def nbytes(dtype: str, shape: tuple[int, ...]) -> int:
    """Bytes that a dense tensor of this wire dtype and shape occupies."""
    return WIRE_DTYPES[dtype].itemsize * element_count(shape)


@dataclass(frozen=True)
class TensorSpec:
    """Name, shape and dtype of one model tensor: what both sides must agree on."""

    name: str
    shape: tuple[int, ...]
    dtype: str = "f32"

    @property
    def nbytes(self) -> int:
        return nbytes(self.dtype, self.shape)


@dataclass(frozen=True)
class ModelSpec:
    """The ordered tensors of a model architecture."""

    tensors: tuple[TensorSpec, ...]

    @classmethod
    def of(cls, weights: Mapping[str, np.ndarray]) -> ModelSpec:
        return cls(tuple(TensorSpec(k, tuple(int(d) for d in v.shape), wire_dtype_of(v)) for k, v in weights.items()))

    @property
    def fingerprint(self) -> str:
        """A hash of names, shapes and dtypes: two models with equal fingerprints are interchangeable."""
        canonical = json.dumps([[t.name, list(t.shape), t.dtype] for t in self.tensors], separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    @property
    def num_parameters(self) -> int:
        return sum(element_count(t.shape) for t in self.tensors)

    def by_name(self) -> dict[str, TensorSpec]:
        return {t.name: t for t in self.tensors}
