"""The five messages of DESIGN.md, each a dataclass with one encoder and one strict decoder.

GlobalModel and Update carry tensors and travel as msgpack; Receipt, Presence and RoundStatus are
small UTF-8 JSON documents that any MQTT tool can read. Nothing outside this module touches
msgpack or json for wire messages. Decoders raise DecodeError and nothing else.
"""

from __future__ import annotations

import enum
import json
import math
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar, TypeVar, cast

import msgpack

from fedge_contract import compact as compact_form
from fedge_contract.codecs import EncodedTensor, check_shape
from fedge_contract.cohort import Participation
from fedge_contract.errors import DecodeError, Reason
from fedge_contract.packing import Piece, assemble, pieces
from fedge_contract.tensors import WIRE_DTYPES

SCHEMA_VERSION = 1
MAX_TENSORS = 4096
MAX_CONTROL_BYTES = 64 * 1024
HELD_HASH_BYTES = 16  # the digest of a rebuilt model (fedge_contract.broadcast.held): SHA-256, truncated
MAX_NOTE = 512  # characters of RoundStatus.note (longer notes are cut)

T = TypeVar("T")


class _Reader:
    """Typed, strict access to one decoded map; errors name the path of the bad field."""

    def __init__(self, obj: object, where: str) -> None:
        if not isinstance(obj, dict):
            raise DecodeError(Reason.WRONG_TYPE, f"{where} must be a map, got {type(obj).__name__}")
        self.obj = obj
        self.where = where

    def take(self, key: str, kind: type[T] | tuple[type, ...], *, default: Any = ..., nullable: bool = False) -> T:
        if key not in self.obj:
            if default is ...:
                raise DecodeError(Reason.MISSING_FIELD, f"{self.where}.{key} is missing")
            return cast(T, default)
        value = self.obj[key]
        if value is None and nullable:
            return cast(T, value)
        kinds = kind if isinstance(kind, tuple) else (kind,)
        ok = isinstance(value, kinds) and not (isinstance(value, bool) and bool not in kinds)
        if float in kinds and isinstance(value, int) and not isinstance(value, bool):
            try:
                ok, value = True, float(value)
            except OverflowError:  # an integer beyond float range (JSON allows any size)
                raise DecodeError(Reason.NON_FINITE, f"{self.where}.{key} is not finite") from None
        if not ok:
            names = "/".join(k.__name__ for k in kinds)
            raise DecodeError(Reason.WRONG_TYPE, f"{self.where}.{key} must be {names}, got {type(value).__name__}")
        if isinstance(value, float) and not math.isfinite(value):
            raise DecodeError(Reason.NON_FINITE, f"{self.where}.{key} is not finite")
        return value  # type: ignore[no-any-return]

    def nonneg_int(self, key: str, **kw: Any) -> int:
        value = self.take(key, int, **kw)
        if value is not None and value < 0:
            raise DecodeError(Reason.BAD_VALUE, f"{self.where}.{key} must be >= 0, got {value}")
        return value


def _scalars(obj: object, where: str, kinds: tuple[type, ...]) -> dict[str, Any]:
    """A flat map of str -> scalar (metrics, device conditions): no nesting, nothing non-finite."""
    reader = _Reader(obj, where)
    if len(reader.obj) > 64:
        raise DecodeError(Reason.BAD_VALUE, f"{where} has more than 64 entries")
    out: dict[str, Any] = {}
    for key in reader.obj:
        if not isinstance(key, str):
            raise DecodeError(Reason.WRONG_TYPE, f"{where} keys must be strings")
        out[key] = reader.take(key, kinds, nullable=True)
    return out


def _header(obj: object, expected_type: str, fleet: str | None) -> _Reader:
    reader = _Reader(obj, expected_type)
    schema = reader.take("schema", int)
    if schema != SCHEMA_VERSION:
        raise DecodeError(Reason.SCHEMA, f"schema {schema} is not supported (this build speaks {SCHEMA_VERSION})")
    kind = reader.take("type", str)
    if kind != expected_type:
        raise DecodeError(Reason.WRONG_TYPE, f"message type {kind!r} where {expected_type!r} was expected")
    msg_fleet = reader.take("fleet", str)
    if fleet is not None and msg_fleet != fleet:
        raise DecodeError(Reason.WRONG_FLEET, f"message for fleet {msg_fleet!r} on fleet {fleet!r}")
    return reader


def _unpack(payload: bytes, max_bytes: int, kind: str) -> object:
    if len(payload) > max_bytes:
        raise DecodeError(Reason.TOO_LARGE, f"{kind} of {len(payload)} bytes exceeds the limit of {max_bytes}")
    try:
        return msgpack.unpackb(payload, raw=False, strict_map_key=True, use_list=True)
    except Exception as exc:  # msgpack raises several unrelated types for broken input
        raise DecodeError(Reason.MALFORMED, f"{kind} is not valid msgpack ({type(exc).__name__}: {exc})") from None


def _tensors(obj: object, kind: str) -> tuple[EncodedTensor, ...]:
    if not isinstance(obj, list):
        raise DecodeError(Reason.WRONG_TYPE, f"{kind}.tensors must be a list")
    if len(obj) > MAX_TENSORS:
        raise DecodeError(Reason.BAD_VALUE, f"{kind} has {len(obj)} tensors (limit {MAX_TENSORS})")
    out = []
    for i, item in enumerate(obj):
        reader = _Reader(item, f"{kind}.tensors[{i}]")
        dtype = reader.take("dtype", str)
        if dtype not in WIRE_DTYPES:
            raise DecodeError(Reason.BAD_TENSOR, f"{reader.where}.dtype {dtype!r} is unknown")
        core = {"name", "dtype", "shape", "codec", "data"}
        extra = {k: v for k, v in reader.obj.items() if k not in core}
        out.append(
            EncodedTensor(
                name=reader.take("name", str),
                dtype=dtype,
                shape=check_shape(reader.take("shape", list), reader.where),
                codec=reader.take("codec", str),
                data=reader.take("data", bytes),
                fields=extra,
            )
        )
    return tuple(out)


@dataclass(frozen=True)
class TaskConfig:
    """What the aggregator asks agents to do this round; unknown keys survive in ``extra``."""

    local_epochs: int = 1
    batch_size: int = 32
    lr: float = 0.05
    momentum: float = 0.0
    weight_decay: float = 0.0
    mu: float = 0.0
    # model-wide top-k 2% with error feedback, Rice-coded positions, one bit a value (bench/codecs.py: with delta
    # broadcasts ~56-60x fewer bytes to 0.90 than float32 both ways; uploads alone: see the README's table)
    codec: str = "flat+topk:0.02+rice+sign"
    # The form of the Update this aggregator decodes (fedge_contract.compact): "compact" (positional
    # arrays) or "map". An aggregator before the compact form sends no such field: read as "map", and
    # left out on the wire when "map", so such a task's bytes and task_id are the same as before.
    update_form: str = "compact"
    extra: Mapping[str, Any] = field(default_factory=dict)

    def to_wire(self) -> dict[str, Any]:
        known = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "extra"}
        if known["update_form"] == "map":
            del known["update_form"]
        return {**self.extra, **known}

    @classmethod
    def from_wire(cls, obj: object) -> TaskConfig:
        reader = _Reader(obj, "task")
        defaults = cls()
        config = cls(
            local_epochs=reader.take("local_epochs", int, default=defaults.local_epochs),
            batch_size=reader.take("batch_size", int, default=defaults.batch_size),
            lr=reader.take("lr", float, default=defaults.lr),
            momentum=reader.take("momentum", float, default=defaults.momentum),
            weight_decay=reader.take("weight_decay", float, default=defaults.weight_decay),
            mu=reader.take("mu", float, default=defaults.mu),
            codec=reader.take("codec", str, default=defaults.codec),
            update_form=reader.take("update_form", str, default="map"),  # absent: an aggregator before compact updates
            extra={k: v for k, v in reader.obj.items() if k not in {f.name for f in fields(cls)}},
        )
        if config.local_epochs < 1 or config.batch_size < 1 or config.lr <= 0:
            raise DecodeError(Reason.BAD_VALUE, f"task needs local_epochs >= 1, batch_size >= 1, lr > 0: {config}")
        return config


@dataclass(frozen=True)
class GlobalModel:
    """Version ``model_version`` of the global model, announced for ``round`` (retained)."""

    TYPE: ClassVar[str] = "global"
    fleet: str
    model_version: int
    round: int
    deadline: float | None
    task: TaskConfig
    fingerprint: str
    tensors: tuple[EncodedTensor, ...]
    final: bool = False  # training is over: this is the result, agents do not train on it
    # With delta broadcasts (fedge_contract.broadcast): the hash of the model these tensors decode
    # to. Absent (None) from a plain full broadcast, whose bytes are then exactly as before.
    held_hash: bytes | None = None
    # Cohort selection and federated evaluation (fedge_contract.cohort): who trains this round, who
    # evaluates this model. Absent (None): every device trains, nobody is asked to evaluate.
    cohort: Participation | None = None

    def to_bytes(self) -> bytes:
        packed: bytes = msgpack.packb(self._wire(), use_bin_type=True)
        return packed

    def to_buffer(self) -> bytearray:
        """``to_bytes()``'s bytes, assembled a piece at a time (fedge_contract.packing): for a large model
        packed by a thread beside an event loop, which a single copy of the whole would stall."""
        return assemble(pieces(self._wire()))

    def _wire(self) -> dict[str, Any]:
        held = {} if self.held_hash is None else {"held_hash": self.held_hash}
        cohort = {} if self.cohort is None else {"cohort": self.cohort.to_wire()}
        return {
            "schema": SCHEMA_VERSION,
            "type": self.TYPE,
            "fleet": self.fleet,
            "final": self.final,
            "model_version": self.model_version,
            "round": self.round,
            "deadline": self.deadline,
            "task": self.task.to_wire(),
            "fingerprint": self.fingerprint,
            **held,
            **cohort,
            "tensors": [t.to_wire() for t in self.tensors],
        }

    @classmethod
    def from_bytes(cls, payload: bytes, *, max_bytes: int, fleet: str | None = None) -> GlobalModel:
        reader = _header(_unpack(payload, max_bytes, cls.TYPE), cls.TYPE, fleet)
        return cls(
            fleet=reader.take("fleet", str),
            model_version=reader.nonneg_int("model_version"),
            round=reader.nonneg_int("round"),
            deadline=reader.take("deadline", float, nullable=True),
            task=TaskConfig.from_wire(reader.take("task", dict)),
            fingerprint=reader.take("fingerprint", str),
            tensors=_tensors(reader.take("tensors", list), cls.TYPE),
            final=reader.take("final", bool, default=False),
            held_hash=take_held_hash(reader, "held_hash") if "held_hash" in reader.obj else None,
            cohort=Participation.from_wire(reader.obj["cohort"]) if "cohort" in reader.obj else None,
        )


def take_held_hash(reader: _Reader, key: str) -> bytes:
    """A rebuilt model's digest: exactly HELD_HASH_BYTES of bin."""
    value: bytes = reader.take(key, bytes)
    if len(value) != HELD_HASH_BYTES:
        raise DecodeError(Reason.BAD_VALUE, f"{reader.where}.{key} must be {HELD_HASH_BYTES} bytes, got {len(value)}")
    return value


def new_update_id() -> str:
    """A fresh idempotency key: 96 random bits as 16 base64url characters.

    Half the length of a uuid4 hex on every update (the digits update is ~400 bytes, so 16 bytes
    count), still collision-free in practice: one chance in ~10^10 after a billion updates.
    """
    return secrets.token_urlsafe(12)


@dataclass(frozen=True)
class Update:
    """An agent's delta (local - global) for ``round``, trained from ``base_version``."""

    TYPE: ClassVar[str] = "update"
    fleet: str
    client_id: str
    update_id: str
    round: int
    base_version: int
    num_samples: int
    tensors: tuple[EncodedTensor, ...]
    metrics: Mapping[str, float] = field(default_factory=dict)
    device: Mapping[str, Any] = field(default_factory=dict)

    def to_bytes(self, *, compact: bool = False) -> bytes:
        """The map form, or with ``compact`` the positional one (fedge_contract.compact), which only an
        aggregator that asks for it (``TaskConfig.update_form``) decodes."""
        wire: dict[str, Any] = {
            "schema": SCHEMA_VERSION,
            "type": self.TYPE,
            "fleet": self.fleet,
            "client_id": self.client_id,
            "update_id": self.update_id,
            "round": self.round,
            "base_version": self.base_version,
            "num_samples": self.num_samples,
            "metrics": dict(self.metrics),
            "device": dict(self.device),
        }
        obj: Any
        if compact:
            codec, tensors = compact_form.tensors_to_wire(self.tensors)
            obj = compact_form.to_slots(compact_form.UPDATE_FIELDS, {
                **wire, "metrics": compact_form.metrics_to_wire(self.metrics), "device": wire["device"] or None,
                "codec": codec, "tensors": tensors,
            })
        else:
            obj = {**wire, "tensors": [t.to_wire() for t in self.tensors]}
        # metrics and device readings: float32 is plenty, 4 bytes less each
        packed: bytes = msgpack.packb(obj, use_bin_type=True, use_single_float=True)
        return packed

    @classmethod
    def from_bytes(cls, payload: bytes, *, max_bytes: int, fleet: str | None = None) -> Update:
        """Either form: a compact array is turned back into the map and checked by the same code."""
        obj = _unpack(payload, max_bytes, cls.TYPE)
        if isinstance(obj, list):
            obj = compact_form.from_slots(obj, compact_form.UPDATE_FIELDS, cls.TYPE, optional=frozenset({"metrics", "device"}))
            obj["tensors"] = compact_form.tensors_from_wire(obj.pop("codec", None), obj.get("tensors"), cls.TYPE)
            if "metrics" in obj:
                obj["metrics"] = compact_form.metrics_from_wire(obj["metrics"], cls.TYPE)
        reader = _header(obj, cls.TYPE, fleet)
        update_id = reader.take("update_id", str)
        if not 1 <= len(update_id) <= 64:
            raise DecodeError(Reason.BAD_VALUE, "update.update_id must be 1-64 characters")
        num_samples = reader.take("num_samples", int)
        if num_samples < 1:
            raise DecodeError(Reason.BAD_VALUE, f"update.num_samples must be >= 1, got {num_samples}")
        return cls(
            fleet=reader.take("fleet", str),
            client_id=reader.take("client_id", str),
            update_id=update_id,
            round=reader.nonneg_int("round"),
            base_version=reader.nonneg_int("base_version"),
            num_samples=num_samples,
            metrics=_scalars(reader.take("metrics", dict, default={}), "update.metrics", (float,)),
            device=_scalars(reader.take("device", dict, default={}), "update.device", (bool, float, str)),
            tensors=_tensors(reader.take("tensors", list), cls.TYPE),
        )

    @staticmethod
    def peek_update_id(payload: bytes, max_bytes: int) -> str | None:
        """Best-effort update id of a payload that failed to decode, so its receipt can name it.

        A payload over ``max_bytes`` is not unpacked at all: its receipt says ``update_id: null``.
        """
        if len(payload) > max_bytes:
            return None
        try:
            obj = msgpack.unpackb(payload, raw=False, strict_map_key=True)
            if isinstance(obj, list):  # the compact form
                slot = compact_form.UPDATE_FIELDS.index("update_id")
                value = obj[slot] if len(obj) == len(compact_form.UPDATE_FIELDS) else None
            else:
                value = obj.get("update_id") if isinstance(obj, dict) else None
            return value if isinstance(value, str) and len(value) <= 64 else None
        except Exception:  # msgpack raises several unrelated types for broken input
            return None


# ---------------------------------------------------------------- JSON control messages


class ReceiptStatus(str, enum.Enum):
    ACCEPTED = "accepted"
    DUPLICATE = "duplicate"
    STALE = "stale"
    REJECTED = "rejected"


class RoundState(str, enum.Enum):
    OPEN = "open"
    AGGREGATING = "aggregating"
    FINISHED = "finished"


def _json_bytes(kind: str, fleet: str, body: dict[str, Any]) -> bytes:
    return json.dumps({"schema": SCHEMA_VERSION, "type": kind, "fleet": fleet, **body}, separators=(",", ":"), allow_nan=False).encode()


def _json_reader(payload: bytes, kind: str, fleet: str | None) -> _Reader:
    if len(payload) > MAX_CONTROL_BYTES:
        raise DecodeError(Reason.TOO_LARGE, f"{kind} of {len(payload)} bytes exceeds {MAX_CONTROL_BYTES}")
    try:
        obj = json.loads(payload.decode("utf-8"), parse_constant=_refuse_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise DecodeError(Reason.MALFORMED, f"{kind} is not UTF-8 JSON ({exc})") from None
    return _header(obj, kind, fleet)


def _refuse_constant(name: str) -> float:
    raise ValueError(f"{name} is not allowed")


@dataclass(frozen=True)
class Receipt:
    """The aggregator's answer to one update (QoS 1, to ``receipts/<client_id>``)."""

    TYPE: ClassVar[str] = "receipt"
    fleet: str
    client_id: str
    update_id: str | None
    status: ReceiptStatus
    reason: str
    round: int
    model_version: int

    def to_bytes(self) -> bytes:
        return _json_bytes(self.TYPE, self.fleet, {
            "client_id": self.client_id, "update_id": self.update_id, "status": self.status.value,
            "reason": self.reason, "round": self.round, "model_version": self.model_version,
        })

    @classmethod
    def from_bytes(cls, payload: bytes, *, fleet: str | None = None) -> Receipt:
        reader = _json_reader(payload, cls.TYPE, fleet)
        status = reader.take("status", str)
        try:
            parsed = ReceiptStatus(status)
        except ValueError:
            raise DecodeError(Reason.BAD_VALUE, f"receipt.status {status!r} is unknown") from None
        return cls(
            fleet=reader.take("fleet", str),
            client_id=reader.take("client_id", str),
            update_id=reader.take("update_id", str, nullable=True),
            status=parsed,
            reason=reader.take("reason", str),
            round=reader.nonneg_int("round"),
            model_version=reader.nonneg_int("model_version"),
        )


@dataclass(frozen=True)
class Presence:
    """Whether an agent is online and able to train (retained; the last will says offline)."""

    TYPE: ClassVar[str] = "presence"
    fleet: str
    client_id: str
    state: str  # online | offline
    agent_version: str = ""
    eligible: bool | None = None
    why_not: str = ""
    device: Mapping[str, Any] = field(default_factory=dict)
    # Updates this device dropped unanswered because their round was over, ever (issue 19). Optional
    # both ways: older agents send none (read as 0), older readers ignore the key.
    dropped: int = 0

    def to_bytes(self) -> bytes:
        return _json_bytes(self.TYPE, self.fleet, {
            "client_id": self.client_id, "state": self.state, "agent_version": self.agent_version,
            "eligible": self.eligible, "why_not": self.why_not, "device": dict(self.device), "dropped": self.dropped,
        })

    @classmethod
    def from_bytes(cls, payload: bytes, *, fleet: str | None = None) -> Presence:
        reader = _json_reader(payload, cls.TYPE, fleet)
        state = reader.take("state", str)
        if state not in ("online", "offline"):
            raise DecodeError(Reason.BAD_VALUE, f"presence.state {state!r} is unknown")
        return cls(
            fleet=reader.take("fleet", str),
            client_id=reader.take("client_id", str),
            state=state,
            agent_version=reader.take("agent_version", str, default=""),
            eligible=reader.take("eligible", bool, default=None, nullable=True),
            why_not=reader.take("why_not", str, default=""),
            device=_scalars(reader.take("device", dict, default={}), "presence.device", (bool, float, str)),
            dropped=reader.nonneg_int("dropped", default=0),
        )


@dataclass(frozen=True)
class RoundStatus:
    """Where the fleet's training stands (retained on ``status``)."""

    TYPE: ClassVar[str] = "status"
    fleet: str
    round: int
    model_version: int
    state: RoundState
    accepted: int
    target: int
    min_updates: int
    deadline: float | None
    rounds_total: int | None = None
    last_metrics: Mapping[str, float] = field(default_factory=dict)
    # What the round says about itself beyond the numbers (a secure round's phase, why a session was
    # abandoned). Optional both ways: older aggregators send none, older readers ignore the key.
    note: str = ""
    # Traffic (issue 16), optional both ways: written only when known, None when absent (older aggregators)
    bytes_up: int | None = None  # update bytes received while the round is open, from every device
    bytes_down: int | None = None  # bytes each device downloads for the round's model announcement

    def __post_init__(self) -> None:
        if len(self.note) > MAX_NOTE:
            object.__setattr__(self, "note", self.note[: MAX_NOTE - 3] + "...")

    def to_bytes(self) -> bytes:
        traffic = {key: value for key, value in (("bytes_up", self.bytes_up), ("bytes_down", self.bytes_down)) if value is not None}
        return _json_bytes(self.TYPE, self.fleet, {
            "round": self.round, "model_version": self.model_version, "state": self.state.value,
            "accepted": self.accepted, "target": self.target, "min": self.min_updates,
            "deadline": self.deadline, "rounds_total": self.rounds_total, "last_metrics": dict(self.last_metrics),
            **({"note": self.note} if self.note else {}), **traffic,
        })

    @classmethod
    def from_bytes(cls, payload: bytes, *, fleet: str | None = None) -> RoundStatus:
        reader = _json_reader(payload, cls.TYPE, fleet)
        state = reader.take("state", str)
        try:
            parsed = RoundState(state)
        except ValueError:
            raise DecodeError(Reason.BAD_VALUE, f"status.state {state!r} is unknown") from None
        return cls(
            fleet=reader.take("fleet", str),
            round=reader.nonneg_int("round"),
            model_version=reader.nonneg_int("model_version"),
            state=parsed,
            accepted=reader.nonneg_int("accepted"),
            target=reader.nonneg_int("target"),
            min_updates=reader.nonneg_int("min"),
            deadline=reader.take("deadline", float, nullable=True),
            rounds_total=reader.take("rounds_total", int, default=None, nullable=True),
            last_metrics=_scalars(reader.take("last_metrics", dict, default={}), "status.last_metrics", (float,)),
            note=reader.take("note", str, default=""),
            bytes_up=reader.nonneg_int("bytes_up", default=None, nullable=True),
            bytes_down=reader.nonneg_int("bytes_down", default=None, nullable=True),
        )


# ---------------------------------------------------------------- weights at rest (checkpoints, outboxes)


def pack_weights(weights: Mapping[str, Any]) -> bytes:
    """Raw float32 tensors as a msgpack list: the checkpoint format (never pickle)."""
    return b"".join(weight_pieces(weights))


def weight_pieces(weights: Mapping[str, Any]) -> list[Piece]:
    """``pack_weights``'s bytes as pieces (fedge_contract.packing): a writer that streams (the store's
    incremental blob I/O) takes them without one copy of the whole model, the tensors' own memory
    included (the codec ``none``'s bytes are the little-endian float32 array as it is)."""
    import numpy as np

    wire = []
    for name, array in weights.items():
        values = np.ascontiguousarray(array, dtype="<f4")
        data = values.reshape(-1).data.cast("B")
        wire.append({"name": name, "dtype": "f32", "shape": [int(d) for d in values.shape], "codec": "none", "data": data})
    return pieces(wire)


def unpack_weights(blob: bytes) -> dict[str, Any]:
    """Inverse of pack_weights; the blob describes its own spec."""
    from fedge_contract.codecs import decode_weights
    from fedge_contract.tensors import ModelSpec, TensorSpec

    tensors = _tensors(_unpack(blob, len(blob), "weights"), "weights")
    spec = ModelSpec(tuple(TensorSpec(t.name, t.shape, "f32") for t in tensors))
    return decode_weights(tensors, spec)
