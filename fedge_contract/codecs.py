"""Codec chains that shrink a float32 tensor for the wire, and the one strict decoder.

A chain is written like ``f16+zstd``: stages joined by ``+``, each ``name`` or ``name:arg``,
in the order they are applied when encoding. Stages fall into ordered classes; a chain holds
at most one stage of each class, in this order:

    value   f16, bf16            (lossy: changes what each element holds)
    bytes   zstd[:level]         (lossless, always last)

``none`` is the empty chain: raw float32. The decoder always rebuilds a dense float32 array of
the expected shape, and bounds every size before it allocates (a small payload never expands
into gigabytes).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import zstandard

from fedge_contract.errors import CodecError, DecodeError, Reason
from fedge_contract.tensors import MAX_RANK, WIRE_DTYPES, ModelSpec, TensorSpec, nbytes

F16_MAX = float(np.finfo(np.float16).max)
BF16_MAX = float(np.array([0x7F7F0000], dtype="<u4").view("<f4")[0])  # largest finite bfloat16


@dataclass(frozen=True)
class EncodedTensor:
    """One tensor as it travels: ``data`` holds ``shape`` elements of ``dtype`` after ``codec``."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    codec: str
    data: bytes
    fields: Mapping[str, Any] = field(default_factory=dict)

    def to_wire(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "dtype": self.dtype,
            "shape": list(self.shape),
            "codec": self.codec,
            "data": self.data,
            **self.fields,
        }


class ValueStage(Protocol):
    """A lossy stage: float32 values in, stored elements of ``wire_dtype`` out."""

    wire_dtype: str

    def encode(self, values: np.ndarray) -> np.ndarray: ...

    def decode(self, stored: np.ndarray) -> np.ndarray: ...


class BytesStage(Protocol):
    """A lossless stage over the stored bytes."""

    def compress(self, data: bytes) -> bytes: ...

    def decompress(self, data: bytes, expected_size: int) -> bytes: ...


class _F16:
    wire_dtype = "f16"

    def encode(self, values: np.ndarray) -> np.ndarray:
        # Saturate instead of overflowing to inf: the receiver rejects inf, and a delta that
        # large is already absurd; saturation keeps the update usable and bounded.
        return np.clip(values, -F16_MAX, F16_MAX).astype("<f2")

    def decode(self, stored: np.ndarray) -> np.ndarray:
        return stored.astype(np.float32)


class _BF16:
    wire_dtype = "bf16"

    def encode(self, values: np.ndarray) -> np.ndarray:
        # saturate like f16 rather than round the largest floats up to inf
        values = np.clip(values, -BF16_MAX, BF16_MAX)
        bits = np.ascontiguousarray(values, dtype="<f4").view("<u4").astype(np.uint64)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16  # round to nearest, ties to even
        return rounded.astype("<u2")

    def decode(self, stored: np.ndarray) -> np.ndarray:
        return (stored.astype("<u4") << 16).view("<f4").astype(np.float32)


class _Zstd:
    def __init__(self, level: int = 3) -> None:
        if not 1 <= level <= 22:
            raise CodecError(f"zstd level must be 1..22, got {level}")
        self.level = level

    def compress(self, data: bytes) -> bytes:
        return zstandard.ZstdCompressor(level=self.level).compress(data)

    def decompress(self, data: bytes, expected_size: int) -> bytes:
        try:
            declared = zstandard.frame_content_size(data)
        except zstandard.ZstdError as exc:
            raise DecodeError(Reason.BAD_TENSOR, f"not a zstd frame ({exc})") from None
        if declared > expected_size:  # -1 (unknown) is bounded by max_output_size below
            raise DecodeError(Reason.BAD_TENSOR, f"zstd frame declares {declared} bytes, expected {expected_size}")
        try:
            # one frame, nothing appended: trailing bytes are a malformed payload, not padding
            out = zstandard.ZstdDecompressor().decompress(data, max_output_size=expected_size, allow_extra_data=False)
        except zstandard.ZstdError as exc:
            raise DecodeError(Reason.BAD_TENSOR, f"zstd: {exc}") from None
        return out


_VALUE_STAGES: dict[str, type] = {"f16": _F16, "bf16": _BF16}
_BYTES_STAGES: dict[str, type] = {"zstd": _Zstd}


@dataclass(frozen=True)
class CodecChain:
    """A parsed chain; ``str(chain)`` is its canonical name on the wire."""

    text: str
    value: ValueStage | None
    lossless: BytesStage | None

    @property
    def wire_dtype(self) -> str:
        return self.value.wire_dtype if self.value else "f32"

    def __str__(self) -> str:
        return self.text


def parse_chain(text: str) -> CodecChain:
    """Parse ``f16+zstd``-style chains; unknown or ill-ordered stages raise CodecError."""
    text = text.strip()
    if text in ("", "none"):
        return CodecChain("none", None, None)
    value: ValueStage | None = None
    lossless: BytesStage | None = None
    for part in text.split("+"):
        name, _, arg = part.partition(":")
        if lossless is not None:
            raise CodecError(f"codec {text!r}: {part!r} comes after the lossless stage, which must be last")
        if name in _VALUE_STAGES:
            if value is not None:
                raise CodecError(f"codec {text!r}: at most one cast/quantisation stage, got a second: {part!r}")
            if arg:
                raise CodecError(f"codec {text!r}: stage {name!r} takes no argument")
            value = _VALUE_STAGES[name]()
        elif name in _BYTES_STAGES:
            try:
                lossless = _BYTES_STAGES[name](int(arg)) if arg else _BYTES_STAGES[name]()
            except ValueError:
                raise CodecError(f"codec {text!r}: {name} level must be an integer, got {arg!r}") from None
        else:
            known = ", ".join(sorted([*_VALUE_STAGES, *_BYTES_STAGES, "none"]))
            raise CodecError(f"codec {text!r}: unknown stage {name!r} (known: {known})")
    return CodecChain(text, value, lossless)


def encode_tensor(name: str, values: np.ndarray, chain: CodecChain) -> EncodedTensor:
    """Encode a float32 array with ``chain``."""
    values = np.ascontiguousarray(values, dtype=np.float32)
    stored = chain.value.encode(values) if chain.value else values.astype("<f4", copy=False)
    data = stored.tobytes()
    if chain.lossless:
        data = chain.lossless.compress(data)
    return EncodedTensor(name, chain.wire_dtype, tuple(int(d) for d in values.shape), str(chain), data)


def decode_tensor(tensor: EncodedTensor, spec: TensorSpec) -> np.ndarray:
    """Rebuild the dense float32 array; every broken rule is a DecodeError, never another exception."""
    if tensor.shape != spec.shape:
        raise DecodeError(Reason.SHAPE_MISMATCH, f"tensor {spec.name!r} has shape {list(tensor.shape)}, model has {list(spec.shape)}")
    try:
        chain = parse_chain(tensor.codec)
    except CodecError as exc:
        raise DecodeError(Reason.CODEC, str(exc)) from None
    if tensor.dtype != chain.wire_dtype:
        raise DecodeError(Reason.BAD_TENSOR, f"tensor {spec.name!r}: codec {tensor.codec!r} stores {chain.wire_dtype}, payload says {tensor.dtype}")
    expected = nbytes(tensor.dtype, tensor.shape)
    data = chain.lossless.decompress(tensor.data, expected) if chain.lossless else tensor.data
    if len(data) != expected:
        raise DecodeError(Reason.BAD_TENSOR, f"tensor {spec.name!r}: {len(data)} bytes for shape {list(tensor.shape)} of {tensor.dtype} (expected {expected})")
    stored = np.frombuffer(data, dtype=WIRE_DTYPES[tensor.dtype]).reshape(tensor.shape)
    values = chain.value.decode(stored) if chain.value else stored.astype(np.float32)
    if not np.isfinite(values).all():
        raise DecodeError(Reason.NON_FINITE, f"tensor {spec.name!r} holds NaN or Inf")
    return values


def check_shape(shape: object, where: str) -> tuple[int, ...]:
    """A shape from the wire: a short list of non-negative ints (no overflow games)."""
    if not isinstance(shape, (list, tuple)) or len(shape) > MAX_RANK:
        raise DecodeError(Reason.WRONG_TYPE, f"{where}.shape must be a list of at most {MAX_RANK} ints")
    dims = []
    for d in shape:
        if not isinstance(d, int) or isinstance(d, bool) or not 0 <= d < 2**31:
            raise DecodeError(Reason.BAD_TENSOR, f"{where}.shape has a bad dimension {d!r}")
        dims.append(d)
    return tuple(dims)


def encode_weights(weights: Mapping[str, np.ndarray], chain: CodecChain) -> tuple[EncodedTensor, ...]:
    """Encode every tensor of a model (or a delta) in order."""
    return tuple(encode_tensor(name, values, chain) for name, values in weights.items())


def decode_weights(tensors: tuple[EncodedTensor, ...], spec: ModelSpec) -> dict[str, np.ndarray]:
    """Decode a whole model or delta; the names must be exactly the spec's, each once."""
    by_name = spec.by_name()
    seen: dict[str, np.ndarray] = {}
    for tensor in tensors:
        if tensor.name not in by_name:
            raise DecodeError(Reason.SHAPE_MISMATCH, f"tensor {tensor.name!r} is not part of the model")
        if tensor.name in seen:
            raise DecodeError(Reason.SHAPE_MISMATCH, f"tensor {tensor.name!r} appears twice")
        seen[tensor.name] = decode_tensor(tensor, by_name[tensor.name])
    missing = [t.name for t in spec.tensors if t.name not in seen]
    if missing:
        raise DecodeError(Reason.SHAPE_MISMATCH, f"tensors missing: {', '.join(missing[:5])}")
    return {t.name: seen[t.name] for t in spec.tensors}
