"""GlobalDelta: a new model version announced as a delta from the version before it.

It travels where the GlobalModel does (``fl/<fleet>/global``, retained; chunked like it, on
``global/<version>/<i>``) and carries the same announcement fields (round, deadline, task,
fingerprint, final), plus:

- ``base_version``: the version this delta applies to, ``model_version - 1``. A *hold*
  (``base_version == model_version``, no tensors) says "you hold this version already": the
  model every device builds itself from the task (version 0), checked by its hash.
- ``held_hash``: the digest (fedge_contract.broadcast.held) of the model a device holds once the
  delta is applied. A device whose rebuild hashes differently refetches.
- ``keyframe_version``: the version of the keyframe retained on ``global/key``, so a device that
  cannot apply the delta knows, before it subscribes, whether retained deltas alone get it here.
- ``tensors``: the delta, encoded by any update codec chain; decoded by the contract's one decoder.

Its ``type`` is ``global_delta``, not ``global``: an agent that predates delta broadcasts refuses it
with ``wrong_type`` instead of mistaking a delta for weights. Old full-model GlobalModels decode as
they always did; ``decode_announcement`` takes either. Retained copies of the deltas since the
keyframe live on ``global/delta/<version>`` (the same message).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import msgpack

from fedge_contract.codecs import EncodedTensor
from fedge_contract.errors import DecodeError, Reason
from fedge_contract.messages import SCHEMA_VERSION, GlobalModel, TaskConfig, _header, _tensors, _unpack, take_held_hash

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
    task: TaskConfig
    fingerprint: str
    held_hash: bytes
    keyframe_version: int
    tensors: tuple[EncodedTensor, ...]
    final: bool = False

    @property
    def is_hold(self) -> bool:
        """No change: the device is expected to hold ``model_version`` already (hash-checked)."""
        return self.base_version == self.model_version

    def to_bytes(self) -> bytes:
        packed: bytes = msgpack.packb(
            {
                "schema": SCHEMA_VERSION,
                "type": self.TYPE,
                "fleet": self.fleet,
                "final": self.final,
                "model_version": self.model_version,
                "base_version": self.base_version,
                "keyframe_version": self.keyframe_version,
                "round": self.round,
                "deadline": self.deadline,
                "task": self.task.to_wire(),
                "fingerprint": self.fingerprint,
                "held_hash": self.held_hash,
                "tensors": [t.to_wire() for t in self.tensors],
            },
            use_bin_type=True,
        )
        return packed

    @classmethod
    def from_bytes(cls, payload: bytes, *, max_bytes: int, fleet: str | None = None) -> GlobalDelta:
        return cls._from_obj(_unpack(payload, max_bytes, cls.TYPE), fleet)

    @classmethod
    def _from_obj(cls, obj: object, fleet: str | None) -> GlobalDelta:
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
        return cls(
            fleet=reader.take("fleet", str),
            model_version=version,
            base_version=base,
            round=reader.nonneg_int("round"),
            deadline=reader.take("deadline", float, nullable=True),
            task=TaskConfig.from_wire(reader.take("task", dict)),
            fingerprint=reader.take("fingerprint", str),
            held_hash=held_hash,
            keyframe_version=keyframe,
            tensors=tensors,
            final=reader.take("final", bool, default=False),
        )


def decode_announcement(payload: bytes, *, max_bytes: int, fleet: str | None = None) -> GlobalModel | GlobalDelta:
    """What arrived on ``global``: a full GlobalModel or a GlobalDelta, by its ``type`` (strict either way)."""
    obj: Any = _unpack(payload, max_bytes, "global")
    kind = obj.get("type") if isinstance(obj, dict) else None
    if kind == GlobalDelta.TYPE:
        return GlobalDelta._from_obj(obj, fleet)
    return GlobalModel.from_bytes(payload, max_bytes=max_bytes, fleet=fleet)  # its own checks name what is wrong
