"""Strict field access for the secure-aggregation messages: every bound is checked before use.

The one place in fedge_contract/secagg that touches msgpack and json. Each accessor names the
field's path in its DecodeError, so a refusal says exactly what was wrong.
"""

from __future__ import annotations

import itertools
import json
import math
from typing import Any

import msgpack

from fedge_contract.errors import DecodeError, Reason
from fedge_contract.messages import SCHEMA_VERSION
from fedge_contract.topics import check_name

MAX_ROUND = (1 << 63) - 1


def pack(body: dict[str, Any]) -> bytes:
    packed: bytes = msgpack.packb(body, use_bin_type=True)
    return packed


def pack_json(body: dict[str, Any]) -> bytes:
    return json.dumps(body, separators=(",", ":"), allow_nan=False).encode()


def unpack(payload: bytes, max_bytes: int, kind: str) -> object:
    """msgpack bytes to plain values; the size is checked first, and msgpack never allocates beyond the payload."""
    if len(payload) > max_bytes:
        raise DecodeError(Reason.TOO_LARGE, f"{kind} of {len(payload)} bytes exceeds the limit of {max_bytes}")
    try:
        return msgpack.unpackb(payload, raw=False, strict_map_key=True, use_list=True)
    except (ValueError, TypeError, msgpack.UnpackException) as exc:  # the kinds msgpack raises for broken input
        raise DecodeError(Reason.MALFORMED, f"{kind} is not valid msgpack ({type(exc).__name__})") from None


def unpack_json(payload: bytes, max_bytes: int, kind: str) -> object:
    if len(payload) > max_bytes:
        raise DecodeError(Reason.TOO_LARGE, f"{kind} of {len(payload)} bytes exceeds the limit of {max_bytes}")
    try:
        return json.loads(payload.decode("utf-8"), parse_constant=_refuse_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise DecodeError(Reason.MALFORMED, f"{kind} is not UTF-8 JSON ({type(exc).__name__})") from None


def _refuse_constant(name: str) -> float:
    raise ValueError(f"{name} is not allowed")


class Fields:
    """One decoded map, read field by field with types and bounds."""

    def __init__(self, obj: object, where: str) -> None:
        if not isinstance(obj, dict):
            raise DecodeError(Reason.WRONG_TYPE, f"{where} must be a map, got {type(obj).__name__}")
        self.obj: dict[str, object] = obj
        self.where = where

    def _get(self, key: str) -> object:
        if key not in self.obj:
            raise DecodeError(Reason.MISSING_FIELD, f"{self.where}.{key} is missing")
        return self.obj[key]

    def _wrong(self, key: str, expected: str, value: object) -> DecodeError:
        return DecodeError(Reason.WRONG_TYPE, f"{self.where}.{key} must be {expected}, got {type(value).__name__}")

    def integer(self, key: str, low: int, high: int) -> int:
        value = self._get(key)
        if not isinstance(value, int) or isinstance(value, bool):
            raise self._wrong(key, "an integer", value)
        if not low <= value <= high:
            raise DecodeError(Reason.BAD_VALUE, f"{self.where}.{key} must be in {low}..{high}, got {value}")
        return value

    def number(self, key: str, low: float, high: float) -> float:
        value = self._get(key)
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise self._wrong(key, "a number", value)
        try:
            number = float(value)
        except OverflowError:
            raise DecodeError(Reason.NON_FINITE, f"{self.where}.{key} is not finite") from None
        if not math.isfinite(number):
            raise DecodeError(Reason.NON_FINITE, f"{self.where}.{key} is not finite")
        if not low <= number <= high:
            raise DecodeError(Reason.BAD_VALUE, f"{self.where}.{key} must be in {low}..{high}, got {number}")
        return number

    def text(self, key: str) -> str:
        value = self._get(key)
        if not isinstance(value, str):
            raise self._wrong(key, "a string", value)
        return value

    def name(self, key: str) -> str:
        """A client id, fleet or session: a name that fits one topic level."""
        value = self.text(key)
        try:
            return check_name(f"{self.where}.{key}", value)
        except ValueError as exc:
            raise DecodeError(Reason.BAD_VALUE, str(exc)) from None

    def blob(self, key: str, size: int | None = None, *, at_most: int | None = None) -> bytes:
        value = self._get(key)
        if not isinstance(value, bytes):
            raise self._wrong(key, "bytes", value)
        if size is not None and len(value) != size:
            raise DecodeError(Reason.BAD_VALUE, f"{self.where}.{key} must be {size} bytes, got {len(value)}")
        if at_most is not None and len(value) > at_most:
            raise DecodeError(Reason.TOO_LARGE, f"{self.where}.{key} of {len(value)} bytes exceeds {at_most}")
        return value

    def items(self, key: str, at_most: int) -> list[Fields]:
        value = self._get(key)
        if not isinstance(value, list):
            raise self._wrong(key, "a list", value)
        if len(value) > at_most:
            raise DecodeError(Reason.BAD_VALUE, f"{self.where}.{key} has {len(value)} entries (limit {at_most})")
        return [Fields(item, f"{self.where}.{key}[{i}]") for i, item in enumerate(value)]

    def names(self, key: str, at_most: int) -> tuple[str, ...]:
        """A list of names, strictly increasing: canonical, so equal sets encode to equal bytes."""
        value = self._get(key)
        if not isinstance(value, list):
            raise self._wrong(key, "a list", value)
        if len(value) > at_most:
            raise DecodeError(Reason.BAD_VALUE, f"{self.where}.{key} has {len(value)} entries (limit {at_most})")
        out = tuple(Fields({key: item}, self.where).name(key) for item in value)
        strictly_increasing(out, f"{self.where}.{key}")
        return out


def strictly_increasing(names: tuple[str, ...], where: str) -> None:
    if any(a >= b for a, b in itertools.pairwise(names)):
        raise DecodeError(Reason.BAD_VALUE, f"{where} must be sorted without repeats")


def check_header(fields: Fields, kind: str, fleet: str | None) -> None:
    schema = fields.integer("schema", 0, 1 << 31)
    if schema != SCHEMA_VERSION:
        raise DecodeError(Reason.SCHEMA, f"schema {schema} is not supported (this build speaks {SCHEMA_VERSION})")
    got = fields.text("type")
    if got != kind:
        raise DecodeError(Reason.WRONG_TYPE, f"message type {got!r} where {kind!r} was expected")
    message_fleet = fields.name("fleet")
    if fleet is not None and message_fleet != fleet:
        raise DecodeError(Reason.WRONG_FLEET, f"message for fleet {message_fleet!r} on fleet {fleet!r}")
