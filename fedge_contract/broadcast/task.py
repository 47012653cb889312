"""The round's TaskConfig, sent once instead of in every delta announcement.

A TaskConfig (epochs, batch size, lr, codec, ...) is ~125 bytes of msgpack that rarely changes,
and a digits delta announcement is ~900 bytes: sent in every one, it was an eighth of what a
device downloads (bench/broadcast.py). So a GlobalDelta names its task by ``task_id`` (8 bytes)
and carries the task itself only when the broadcaster says so: in the first announcement after a
start and whenever the task changes. The task is also retained on ``global/task`` as a GlobalTask,
so a device that missed the announcement that carried it (new, restarted without state, or
offline at the time) fetches it there (~150 bytes). Full GlobalModels (resets, keyframes, plain
broadcasts) always carry their task, as before.

``task_id`` is a digest of the task's *normal form* (encoded, decoded, encoded again, keys
sorted), so the aggregator and a device compute the same id from the same task whatever Python
types built it (an ``lr`` given as the int 1 travels as a float after decoding). Integrity
against bugs, not forgery: only the aggregator may publish under ``global``.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import ClassVar

import msgpack

from fedge_contract.errors import DecodeError, Reason
from fedge_contract.messages import SCHEMA_VERSION, TaskConfig, _header, _Reader, _unpack

__all__ = ["MAX_TASK_BYTES", "TASK_ID_BYTES", "GlobalTask", "take_task", "task_id"]

TASK_ID_BYTES = 8
MAX_TASK_BYTES = 64 * 1024  # a GlobalTask (the TaskConfig's extra fields are the only part that can grow)
_TAG = b"fedge-task-v1\0"


def task_id(task: TaskConfig) -> bytes:
    """The digest that names ``task`` in announcements (see the module docstring for the normal form)."""
    normal = TaskConfig.from_wire(msgpack.unpackb(msgpack.packb(task.to_wire(), use_bin_type=True), raw=False)).to_wire()
    packed = msgpack.packb(sorted(normal.items()), use_bin_type=True)
    return hashlib.sha256(_TAG + packed).digest()[:TASK_ID_BYTES]


def take_task(reader: _Reader, *, required: bool) -> tuple[bytes, TaskConfig | None]:
    """``task_id`` and the optional inline ``task`` of a message; the id must name the task it comes with."""
    ident: bytes = reader.take("task_id", bytes)
    if len(ident) != TASK_ID_BYTES:
        raise DecodeError(Reason.BAD_VALUE, f"{reader.where}.task_id must be {TASK_ID_BYTES} bytes, got {len(ident)}")
    if "task" not in reader.obj and not required:
        return ident, None
    task = TaskConfig.from_wire(reader.take("task", dict))
    if task_id(task) != ident:
        raise DecodeError(Reason.BAD_VALUE, f"{reader.where}.task_id does not name the task it carries")
    return ident, task


@dataclass(frozen=True)
class GlobalTask:
    """The current task, retained on ``fl/<fleet>/global/task`` for devices whose announcement only names it."""

    TYPE: ClassVar[str] = "global_task"
    fleet: str
    task: TaskConfig

    @property
    def task_id(self) -> bytes:
        return task_id(self.task)

    def to_bytes(self) -> bytes:
        packed: bytes = msgpack.packb(
            {"schema": SCHEMA_VERSION, "type": self.TYPE, "fleet": self.fleet, "task_id": self.task_id, "task": self.task.to_wire()},
            use_bin_type=True,
        )
        return packed

    @classmethod
    def from_bytes(cls, payload: bytes, *, max_bytes: int = MAX_TASK_BYTES, fleet: str | None = None) -> GlobalTask:
        reader = _header(_unpack(payload, max_bytes, cls.TYPE), cls.TYPE, fleet)
        _, task = take_task(reader, required=True)
        assert task is not None
        return cls(fleet=reader.take("fleet", str), task=task)
