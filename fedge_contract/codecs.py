"""Codec chains that shrink a float32 tensor for the wire, and the one strict decoder.

A chain is written like ``topk:0.01+q8+zstd``: stages joined by ``+``, each ``name`` or
``name:arg``, in the order they are applied when encoding. Stages fall into ordered classes; a
chain holds at most one stage of each class, in this order:

    layout    flat                   the whole model as one vector (codec_stages.layout)
    sparsify  topk:<fraction>        keep the largest-|x| coordinates (codec_stages.topk)
    positions rice                   Rice-code topk's positions (codec_stages.rice; needs topk)
    value     f16, bf16              casts (codec_stages.casts)
              q8[:block], q4[:block] per-block scale, stochastic rounding (codec_stages.quant)
              sign[:block]           one bit a value, per-block mean magnitude (codec_stages.sign)
    lossless  zstd[:level], lz4      always last (codec_stages.lossless)

``none`` is the empty chain: raw float32. On the wire a tensor is ``dtype`` (the value stage's:
f32, f16, bf16, i8 for q8, u8 for packed q4), ``shape``, ``codec`` (the canonical chain) and
``data`` = lossless(indices ++ values), where ``indices`` is the sparsify stage's section (absent
without one) and ``values`` the value stage's bytes for the kept coordinates. Every section's size
follows from the codec text and the shape alone, so there are no size fields to trust: the
decoder computes the exact decompressed size (with ``rice``, the position section's bounds: it is
what the exact value section leaves) before it decompresses or allocates anything (a small
payload never expands into gigabytes), and always rebuilds a dense float32 array of the expected
shape. With ``flat`` the message holds one such tensor, named ``*``, of shape
``[num_parameters]``: the model's tensors concatenated in its order, split back by the receiver's
own spec. A lossy chain's sender learns what the receiver will rebuild by decoding its own
tensor (edge_agent.residuals does, for error feedback).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fedge_contract.codec_stages import (
    BF16,
    F16,
    F32,
    FLAT_NAME,
    LZ4,
    Q4,
    Q8,
    Flat,
    LosslessStage,
    Rice,
    Sign,
    SparsifyStage,
    TopK,
    ValueStage,
    Zstd,
)
from fedge_contract.codec_stages.casts import BF16_MAX, F16_MAX
from fedge_contract.codec_stages.topk import fraction_text
from fedge_contract.errors import CodecError, DecodeError, Reason
from fedge_contract.tensors import MAX_RANK, ModelSpec, TensorSpec, element_count

__all__ = [
    "BF16_MAX",
    "F16_MAX",
    "FLAT_NAME",
    "CodecChain",
    "CodecError",
    "EncodedTensor",
    "check_shape",
    "decode_tensor",
    "decode_weights",
    "encode_tensor",
    "encode_weights",
    "fitted_to",
    "parse_chain",
]

BytesStage = LosslessStage  # the name this module used before lz4 joined zstd


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


_SPARSIFY: dict[str, type] = {"topk": TopK}
_VALUE: dict[str, type] = {"f16": F16, "bf16": BF16, "q8": Q8, "q4": Q4, "sign": Sign}
_LOSSLESS: dict[str, type] = {"zstd": Zstd, "lz4": LZ4}
_LAYOUT: dict[str, type] = {"flat": Flat}
_POSITIONS: dict[str, type] = {"rice": Rice}
_CLASSES = (("layout", _LAYOUT), ("sparsify", _SPARSIFY), ("positions", _POSITIONS), ("value", _VALUE), ("lossless", _LOSSLESS))
_F32 = F32()


@dataclass(frozen=True)
class CodecChain:
    """A parsed chain; ``str(chain)`` is its canonical name on the wire."""

    text: str
    value: ValueStage | None
    lossless: LosslessStage | None
    sparsify: SparsifyStage | None = None
    flat: bool = False  # the whole model travels as one vector (codec_stages.layout)

    @property
    def wire_dtype(self) -> str:
        return self.value.wire_dtype if self.value else "f32"

    @property
    def lossy(self) -> bool:
        """True when the receiver may rebuild something other than what was encoded."""
        return self.value is not None or self.sparsify is not None

    @property
    def stochastic(self) -> bool:
        """True when encoding draws from the rng (two encodes of one tensor may differ)."""
        return self.value is not None and self.value.stochastic

    def stored_bounds(self, n: int) -> tuple[int, int]:
        """Fewest and most bytes before the lossless stage for a tensor of ``n`` elements, from the chain
        alone: equal for every chain but one with Rice-coded positions (codec_stages.rice)."""
        values = self.values_nbytes(n)
        low, high = self.sparsify.index_bounds(n) if self.sparsify else (0, 0)
        return low + values, high + values

    def stored_nbytes(self, n: int) -> int:
        """Bytes before the lossless stage for a tensor of ``n`` elements, for a chain whose size is exact."""
        low, high = self.stored_bounds(n)
        if low != high:
            raise ValueError(f"codec {self.text!r} has no fixed size ({low}-{high} bytes for {n} elements)")
        return low

    def values_nbytes(self, n: int) -> int:
        """Bytes of the value section (the kept coordinates after the value stage): always exact."""
        return (self.value or _F32).nbytes(self.sparsify.count(n) if self.sparsify else n)

    def __str__(self) -> str:
        return self.text


def parse_chain(text: str) -> CodecChain:
    """Parse ``topk:0.01+q8+zstd``-style chains; unknown or ill-ordered stages raise CodecError."""
    return _parse(text.strip())


@functools.lru_cache(maxsize=64)
def _parse(text: str) -> CodecChain:
    if text in ("", "none"):
        return CodecChain("none", None, None)
    stages: dict[str, Any] = {}
    last_class = -1
    for part in text.split("+"):
        name, _, arg = part.partition(":")
        found = [(i, kind, table[name]) for i, (kind, table) in enumerate(_CLASSES) if name in table]
        if not found:
            known = ", ".join(sorted([*_LAYOUT, *_SPARSIFY, *_POSITIONS, *_VALUE, *_LOSSLESS, "none"]))
            raise CodecError(f"codec {text!r}: unknown stage {name!r} (known: {known})")
        index, kind, cls = found[0]
        if kind in stages:
            raise CodecError(f"codec {text!r}: at most one {kind} stage, got a second: {part!r}")
        if index < last_class:
            order = " < ".join(k for k, _ in _CLASSES)
            raise CodecError(f"codec {text!r}: {part!r} is out of order (stages go {order}; the lossless stage is last)")
        last_class = index
        try:
            stages[kind] = cls(arg)
        except CodecError as exc:
            raise CodecError(f"codec {text!r}: {exc}") from None
    if "positions" in stages:
        if "sparsify" not in stages:
            raise CodecError(f"codec {text!r}: {stages['positions'].text!r} codes top-k positions: it needs a topk stage before it")
        stages["sparsify"].coded_by(stages["positions"])
    ordered = [stages.get(kind) for kind, _ in _CLASSES]
    canonical = "+".join(s.text for s in ordered if s is not None)
    return CodecChain(canonical, stages.get("value"), stages.get("lossless"), stages.get("sparsify"), flat="layout" in stages)


def fitted_to(chain: CodecChain, weights: Mapping[str, np.ndarray]) -> CodecChain:
    """``chain`` with its top-k fraction lowered to keep only the nonzero coordinates, when fewer than k of the
    whole vector are nonzero (a flat chain; any other is returned as it is).

    Top-k keeps exactly k coordinates, so when a vector changes in few places (a frozen backbone under
    a trained head) it would send zeros, at full price with Rice positions and sign values. The
    fraction travels in the codec text of each message, so a decoder needs nothing new: it reads the
    lower k from the text as it reads any other."""
    if not chain.flat or chain.sparsify is None:
        return chain
    n = sum(int(np.size(values)) for values in weights.values())
    nonzero = max(1, sum(int(np.count_nonzero(values)) for values in weights.values()))
    if n == 0 or nonzero >= chain.sparsify.count(n):
        return chain
    fraction = fraction_text(nonzero, n)
    if fraction is None:
        return chain
    return parse_chain("+".join(f"topk:{fraction}" if part.startswith("topk:") else part for part in str(chain).split("+")))


def encode_tensor(name: str, values: np.ndarray, chain: CodecChain, rng: np.random.Generator | None = None) -> EncodedTensor:
    """Encode a float32 array with ``chain``; ``rng`` drives stochastic rounding (seed it to reproduce)."""
    values = np.ascontiguousarray(values, dtype=np.float32)
    flat = values.reshape(-1)
    value_stage = chain.value or _F32
    if chain.sparsify is not None:
        indices = chain.sparsify.select(flat)
        data = chain.sparsify.encode_indices(indices, flat.size) + value_stage.encode(flat[indices], rng)
    else:
        data = value_stage.encode(flat, rng)
    if chain.lossless is not None:
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
    where = f"tensor {spec.name!r}"
    if tensor.dtype != chain.wire_dtype:
        raise DecodeError(Reason.BAD_TENSOR, f"{where}: codec {tensor.codec!r} stores {chain.wire_dtype}, payload says {tensor.dtype}")
    n = element_count(tensor.shape)
    low, high = chain.stored_bounds(n)  # bounded by the model's own shape: nothing from the payload
    data = chain.lossless.decompress(tensor.data, high) if chain.lossless else tensor.data
    if not low <= len(data) <= high:
        expected = f"{low}" if low == high else f"{low}-{high}"
        raise DecodeError(Reason.BAD_TENSOR,
                          f"{where}: {len(data)} bytes for shape {list(tensor.shape)} with codec {tensor.codec!r} (expected {expected})")
    view = memoryview(data)
    value_stage = chain.value or _F32
    if chain.sparsify is not None:
        split = len(data) - chain.values_nbytes(n)  # the value section's size is exact: the positions are the rest
        indices = chain.sparsify.decode_indices(view[:split], n, where)
        kept = value_stage.decode(view[split:], indices.size, where)
        values = np.zeros(n, np.float32)
        values[indices] = kept
    else:
        values = kept = value_stage.decode(view, n, where)
    if not np.isfinite(kept).all():
        raise DecodeError(Reason.NON_FINITE, f"{where} holds NaN or Inf")
    return values.reshape(tensor.shape)


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


def encode_weights(
    weights: Mapping[str, np.ndarray], chain: CodecChain, rng: np.random.Generator | None = None
) -> tuple[EncodedTensor, ...]:
    """Encode every tensor of a model (or a delta) in order; ``rng`` as for encode_tensor.

    A ``flat`` chain encodes them as one concatenated float32 vector named ``*``.
    """
    if not chain.flat:
        return tuple(encode_tensor(name, values, chain, rng) for name, values in weights.items())
    arrays = [np.asarray(v) for v in weights.values()]
    if any(a.dtype.kind != "f" for a in arrays):
        raise CodecError("a flat codec needs floating-point tensors only")
    flat = np.concatenate([a.reshape(-1) for a in arrays]) if arrays else np.zeros(0, np.float32)
    return (encode_tensor(FLAT_NAME, flat, chain, rng),)


def decode_weights(tensors: tuple[EncodedTensor, ...], spec: ModelSpec) -> dict[str, np.ndarray]:
    """Decode a whole model or delta; the names must be exactly the spec's, each once (or one ``*``: flat)."""
    if len(tensors) == 1 and tensors[0].name == FLAT_NAME:
        return _decode_flat(tensors[0], spec)
    by_name = spec.by_name()
    seen: dict[str, np.ndarray] = {}
    for tensor in tensors:
        if tensor.name not in by_name:
            raise DecodeError(Reason.SHAPE_MISMATCH, f"tensor {tensor.name!r} is not part of the model")
        if tensor.name in seen:
            raise DecodeError(Reason.SHAPE_MISMATCH, f"tensor {tensor.name!r} appears twice")
        if _chain_of(tensor).flat:
            raise DecodeError(Reason.CODEC, f"tensor {tensor.name!r}: a flat codec carries the whole model as one tensor named {FLAT_NAME!r}")
        seen[tensor.name] = decode_tensor(tensor, by_name[tensor.name])
    missing = [t.name for t in spec.tensors if t.name not in seen]
    if missing:
        raise DecodeError(Reason.SHAPE_MISMATCH, f"tensors missing: {', '.join(missing[:5])}")
    return {t.name: seen[t.name] for t in spec.tensors}


def _chain_of(tensor: EncodedTensor) -> CodecChain:
    try:
        return parse_chain(tensor.codec)
    except CodecError as exc:
        raise DecodeError(Reason.CODEC, str(exc)) from None


def _decode_flat(tensor: EncodedTensor, spec: ModelSpec) -> dict[str, np.ndarray]:
    """Split a flat-coded vector back into the spec's tensors (the split comes from the spec alone)."""
    if not _chain_of(tensor).flat:
        raise DecodeError(Reason.CODEC, f"tensor {FLAT_NAME!r} needs a flat codec, got {tensor.codec!r}")
    if any(t.dtype != "f32" for t in spec.tensors):
        raise DecodeError(Reason.CODEC, "a flat codec needs a model of float32 tensors only")
    vector = decode_tensor(tensor, TensorSpec(FLAT_NAME, (spec.num_parameters,)))
    out: dict[str, np.ndarray] = {}
    offset = 0
    for t in spec.tensors:
        n = element_count(t.shape)
        out[t.name] = vector[offset : offset + n].reshape(t.shape)
        offset += n
    return out
