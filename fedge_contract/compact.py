"""The compact form of the messages sent every round: positional msgpack arrays instead of maps.

A digits Update carried 243 bytes of envelope around ~190 bytes of delta, and a delta broadcast
263 around ~600 (bench/broadcast.py): field names were half of it (``base_version``,
``keyframe_version``, ``train_seconds``, a tensor's ``name``/``dtype``/``shape``/``codec`` keys),
the rest values a receiver can derive. The compact form is the map form without its keys, plus
three derivations:

- **field names**: the message is an array whose slots are the map's fields in a fixed order
  (``UPDATE_FIELDS``, ``DELTA_FIELDS``); optional fields are nil, not absent. It starts with
  ``type`` and ``schema``, as every fedge message does;
- **tensors**: one ``codec`` for the message (an encoder uses one chain for every tensor), then
  each tensor as ``[name, shape, data]``; its ``dtype`` is the chain's wire dtype;
- **metrics** (Update): the agent's three, ``loss``, ``accuracy``, ``train_seconds``, as 6 bytes of
  bfloat16 (3 significant digits, float32's range; NaN: not reported), not ~44 bytes of map.

Decoding turns the array back into the map form and runs the map decoder, so every rule (types,
ranges, sizes, hashes) is the same code; an array of another length is WRONG_TYPE.

Who sends it, and what an older receiver does with it:

- **Update**: an agent sends the compact form only when the round's task asks for it
  (``TaskConfig.update_form == "compact"``), which only an aggregator that decodes it does (the
  contract's TaskConfig asks for it by default). An aggregator before it never asks, and gets maps.
  An aggregator of this contract decodes both forms, so agents before it keep working.
- **GlobalDelta**: always compact. Decoders read both forms. A device whose contract predates
  compact announcements (none released: delta broadcasts are newer still) refuses one with
  ``wrong_type: global_delta must be a map, got list``, never mis-reads it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from fedge_contract.codecs import EncodedTensor, parse_chain
from fedge_contract.errors import CodecError, DecodeError, Reason

__all__ = [
    "COMPACT_METRICS",
    "DELTA_FIELDS",
    "UPDATE_FIELDS",
    "from_slots",
    "metrics_from_wire",
    "metrics_to_wire",
    "tensors_from_wire",
    "tensors_to_wire",
    "to_slots",
]

UPDATE_FIELDS = ("type", "schema", "fleet", "client_id", "update_id", "round", "base_version", "num_samples",
                 "metrics", "device", "codec", "tensors")
DELTA_FIELDS = ("type", "schema", "fleet", "model_version", "base_version", "keyframe_version", "round", "deadline",
                "task_id", "task", "fingerprint", "held_hash", "final", "cohort", "codec", "tensors")
COMPACT_METRICS = ("loss", "accuracy", "train_seconds")
_BF16_MAX = float(np.array([0x7F7F0000], dtype="<u4").view("<f4")[0])
_BF16_NAN = 0x7FC0


def to_slots(fields: Sequence[str], values: Mapping[str, Any]) -> list[Any]:
    """The map form's ``values`` as the compact array (a field the map leaves out is nil)."""
    unknown = set(values) - set(fields)
    if unknown:
        raise ValueError(f"the compact form has no slot for {sorted(unknown)}")
    return [values.get(name) for name in fields]


def from_slots(obj: list[Any], fields: Sequence[str], kind: str, *, optional: frozenset[str]) -> dict[str, Any]:
    """The compact array as the map form, for the map decoder: a nil ``optional`` field is left out
    (the map form omits it), any other nil stays nil (the field is nullable or the decoder refuses it)."""
    if len(obj) != len(fields):
        raise DecodeError(Reason.WRONG_TYPE, f"{kind} must be a map or an array of {len(fields)} fields, got an array of {len(obj)}")
    return {name: value for name, value in zip(fields, obj, strict=True) if value is not None or name not in optional}


def tensors_to_wire(tensors: Sequence[EncodedTensor]) -> tuple[str, list[list[Any]]]:
    """(the message's codec, its tensors as ``[name, shape, data]``); every tensor must share the codec."""
    codecs = {t.codec for t in tensors}
    if len(codecs) > 1:
        raise ValueError(f"the compact form carries one codec per message, these tensors use {sorted(codecs)}")
    if any(t.fields for t in tensors):
        raise ValueError("the compact form has no room for extra tensor fields")
    return (codecs.pop() if codecs else ""), [[t.name, list(t.shape), t.data] for t in tensors]


def tensors_from_wire(codec: object, tensors: object, kind: str) -> list[dict[str, Any]]:
    """Compact tensors as the map form's tensor maps (dtype from the codec), for the map decoder's checks."""
    if not isinstance(codec, str):
        raise DecodeError(Reason.WRONG_TYPE, f"{kind}.codec must be str, got {type(codec).__name__}")
    if not isinstance(tensors, list):
        raise DecodeError(Reason.WRONG_TYPE, f"{kind}.tensors must be a list")
    if not tensors:
        if codec:
            raise DecodeError(Reason.BAD_VALUE, f"{kind} names codec {codec!r} but carries no tensors")
        return []
    try:
        dtype = parse_chain(codec).wire_dtype
    except CodecError as exc:
        raise DecodeError(Reason.CODEC, str(exc)) from None
    out = []
    for i, item in enumerate(tensors):
        if not isinstance(item, list) or len(item) != 3:
            raise DecodeError(Reason.WRONG_TYPE, f"{kind}.tensors[{i}] must be [name, shape, data]")
        name, shape, data = item
        out.append({"name": name, "dtype": dtype, "shape": shape, "codec": codec, "data": data})
    return out


def metrics_to_wire(metrics: Mapping[str, float]) -> bytes:
    """The three agent metrics as bfloat16 (round to nearest even, saturated; NaN or missing: not reported)."""
    unknown = set(metrics) - set(COMPACT_METRICS)
    if unknown:
        raise ValueError(f"the compact form carries only the metrics {COMPACT_METRICS}, not {sorted(unknown)}")
    values = np.array([metrics.get(name, np.nan) for name in COMPACT_METRICS], dtype=np.float64)
    values = np.clip(values, -_BF16_MAX, _BF16_MAX).astype("<f4")  # NaN stays NaN
    bits = values.view("<u4").astype(np.uint64)
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype("<u2")
    rounded[np.isnan(values)] = _BF16_NAN
    return rounded.tobytes()


def metrics_from_wire(data: object, kind: str) -> dict[str, float]:
    if not isinstance(data, bytes) or len(data) != 2 * len(COMPACT_METRICS):
        raise DecodeError(Reason.WRONG_TYPE, f"{kind}.metrics must be {2 * len(COMPACT_METRICS)} bytes of bfloat16")
    values = (np.frombuffer(data, "<u2").astype("<u4") << 16).view("<f4")
    if np.isinf(values).any():
        raise DecodeError(Reason.NON_FINITE, f"{kind}.metrics holds an infinity")
    return {name: float(v) for name, v in zip(COMPACT_METRICS, values, strict=True) if not np.isnan(v)}
