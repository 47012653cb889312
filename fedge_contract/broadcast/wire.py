"""GlobalDelta: a new model version announced as a delta from the version before it.

It travels where the GlobalModel does (``fl/<fleet>/global``, retained; chunked like it, on
``global/<version>/<i>``) and carries the same announcement fields (round, deadline, fingerprint,
final), plus:

- ``base_version``: the version this delta applies to, ``model_version - 1``. A *hold*
  (``base_version == model_version``, no tensors) says "you hold this version already": the
  model every device builds itself from the task (version 0), checked by its hash.
- ``held_hash``: the digest (fedge_contract.broadcast.held) of the model a device holds once the
  delta is applied. A device whose rebuild hashes differently refetches.
- ``keyframe_version``: the version of the keyframe retained on ``global/key``, so a device that
  cannot apply the delta knows, before it subscribes, whether retained deltas alone get it here.
- ``tensors``: the delta, encoded by any update codec chain; decoded by the contract's one decoder.
- ``task_id``: the digest of the round's TaskConfig (fedge_contract.broadcast.task), and ``task``
  itself only when the broadcaster sends it (the first announcement after a start, a changed
  task); a device that does not hold the named task fetches it from ``global/task``.
- ``final``: whether training is over (in the map form only when true; absent reads as False).
- ``cohort`` as a GlobalModel carries it (fedge_contract.cohort): who trains this round, who
  evaluates; absent when every device trains.

Its ``type`` is ``global_delta``, not ``global``: an agent that predates delta broadcasts refuses it
with ``wrong_type`` instead of mistaking a delta for weights. Old full-model GlobalModels decode as
they always did; ``decode_announcement`` takes either. Retained copies of the deltas since the
keyframe live on ``global/delta/<version>`` (the same message).

It travels in the compact form (fedge_contract.compact: a positional array, one codec for its
tensors, the fingerprint as its 8 bytes): ~105 bytes of envelope where the map form took ~265. The
map form still decodes.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, ClassVar

import msgpack

from fedge_contract import compact
from fedge_contract.broadcast.task import take_task, task_id
from fedge_contract.codecs import EncodedTensor
from fedge_contract.cohort import Participation
from fedge_contract.errors import DecodeError, Reason
from fedge_contract.messages import SCHEMA_VERSION, GlobalModel, TaskConfig, _header, _tensors, _unpack, take_held_hash
from fedge_contract.packing import assemble, pieces

__all__ = ["GlobalDelta", "decode_announcement"]


@dataclass(frozen=True)
class GlobalDelta:
    """Version ``model_version`` as the delta that makes it from ``base_version`` (announced for ``round``)."""

    TYPE: ClassVar[str] = "global_delta"
    fleet: str
    model_version: int
    base_version: int
    round: int
    deadline: float | None
    task: TaskConfig | None  # None: only named by task_id (the device holds or fetches it)
    fingerprint: str
    held_hash: bytes
    keyframe_version: int
    tensors: tuple[EncodedTensor, ...]
    final: bool = False
    task_id: bytes = field(default=b"")  # computed from ``task`` when left empty
    cohort: Participation | None = None  # who trains, who evaluates (None: every device trains)

    def __post_init__(self) -> None:
        if not self.task_id:
            if self.task is None:
                raise ValueError("a GlobalDelta needs its task or the task's id")
            object.__setattr__(self, "task_id", task_id(self.task))

    @property
    def is_hold(self) -> bool:
        """No change: the device is expected to hold ``model_version`` already (hash-checked)."""
        return self.base_version == self.model_version

    def to_bytes(self) -> bytes:
        """The compact form (fedge_contract.compact)."""
        packed: bytes = msgpack.packb(self._wire(), use_bin_type=True)
        return packed

    def to_buffer(self) -> bytearray:
        """``to_bytes()``'s bytes, assembled a piece at a time (fedge_contract.packing): a large delta (a q8
        chain of a big model) packed by a thread beside an event loop, which one copy of the whole would stall."""
        return assemble(pieces(self._wire()))

    def _wire(self) -> list[Any]:
        """The compact array (fedge_contract.compact): what ``to_bytes`` and ``to_buffer`` both encode."""
        codec, tensors = compact.tensors_to_wire(self.tensors)
        return compact.to_slots(compact.DELTA_FIELDS, {
            "type": self.TYPE,
            "schema": SCHEMA_VERSION,
            "fleet": self.fleet,
            "model_version": self.model_version,
            "base_version": self.base_version,
            "keyframe_version": self.keyframe_version,
            "round": self.round,
            "deadline": self.deadline,
            "task_id": self.task_id,
            "task": None if self.task is None else self.task.to_wire(),
            "fingerprint": _fingerprint_to_wire(self.fingerprint),
            "held_hash": self.held_hash,
            "final": self.final,
            "cohort": None if self.cohort is None else self.cohort.to_wire(),
            "codec": codec,
            "tensors": tensors,
        })

    @classmethod
    def from_bytes(cls, payload: bytes, *, max_bytes: int, fleet: str | None = None) -> GlobalDelta:
        return cls._from_obj(_unpack(payload, max_bytes, cls.TYPE), fleet)

    @classmethod
    def _from_obj(cls, obj: object, fleet: str | None) -> GlobalDelta:
        """Either form: the compact array is turned back into the map, then checked by the same code."""
        if isinstance(obj, list):
            obj = compact.from_slots(obj, compact.DELTA_FIELDS, cls.TYPE, optional=frozenset({"task", "cohort"}))
            obj["tensors"] = compact.tensors_from_wire(obj.pop("codec", None), obj.get("tensors"), cls.TYPE)
            if isinstance(obj.get("fingerprint"), bytes):
                obj["fingerprint"] = _fingerprint_from_wire(obj["fingerprint"])
        reader = _header(obj, cls.TYPE, fleet)
        version = reader.nonneg_int("model_version")
        base = reader.nonneg_int("base_version")
        keyframe = reader.nonneg_int("keyframe_version")
        tensors = _tensors(reader.take("tensors", list), cls.TYPE)
        if base not in (version - 1, version):
            raise DecodeError(Reason.BAD_VALUE, f"{cls.TYPE}.base_version {base} for version {version}: a delta applies to the version before")
        if (base == version) != (not tensors):
            raise DecodeError(Reason.BAD_VALUE, f"{cls.TYPE} v{version}: a hold (base_version == model_version) has no tensors, a delta has some")
        if keyframe > version:
            raise DecodeError(Reason.BAD_VALUE, f"{cls.TYPE}.keyframe_version {keyframe} is after version {version}")
        held_hash = take_held_hash(reader, "held_hash")
        ident, task = take_task(reader, required=False)
        return cls(
            fleet=reader.take("fleet", str),
            model_version=version,
            base_version=base,
            round=reader.nonneg_int("round"),
            deadline=reader.take("deadline", float, nullable=True),
            task=task,
            fingerprint=reader.take("fingerprint", str),
            held_hash=held_hash,
            keyframe_version=keyframe,
            tensors=tensors,
            final=reader.take("final", bool, default=False),
            task_id=ident,
            cohort=Participation.from_wire(reader.obj["cohort"]) if "cohort" in reader.obj else None,
        )

    def with_task(self, task: TaskConfig) -> GlobalDelta:
        """This announcement with the task its ``task_id`` names (held by the device, or fetched from ``global/task``)."""
        if task_id(task) != self.task_id:
            raise DecodeError(Reason.BAD_VALUE, f"{self.TYPE} v{self.model_version} names another task than the one given")
        return replace(self, task=task)


def _fingerprint_to_wire(fingerprint: str) -> bytes | str:
    """A model fingerprint (16 hex characters) as its 8 bytes; anything else as it is."""
    try:
        raw = bytes.fromhex(fingerprint)
    except ValueError:
        return fingerprint
    return raw if len(raw) == 8 and raw.hex() == fingerprint else fingerprint


def _fingerprint_from_wire(raw: bytes) -> str:
    if len(raw) != 8:
        raise DecodeError(Reason.BAD_VALUE, f"{GlobalDelta.TYPE}.fingerprint must be 8 bytes, got {len(raw)}")
    return raw.hex()


def decode_announcement(payload: bytes, *, max_bytes: int, fleet: str | None = None) -> GlobalModel | GlobalDelta:
    """What arrived on ``global``: a full GlobalModel or a GlobalDelta, by its ``type`` (strict either way)."""
    obj: Any = _unpack(payload, max_bytes, "global")
    kind = obj.get("type") if isinstance(obj, dict) else obj[0] if isinstance(obj, list) and obj else None
    if kind == GlobalDelta.TYPE:
        return GlobalDelta._from_obj(obj, fleet)
    return GlobalModel.from_bytes(payload, max_bytes=max_bytes, fleet=fleet)  # its own checks name what is wrong
