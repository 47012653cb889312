"""What the encoder produces per version (Broadcast, Keyframe, Step), and their form at rest.

A Broadcast or Keyframe holds the encoded tensors exactly as they went out: stochastic rounding
makes a second encode differ, so a restarted aggregator must re-announce the stored bytes, not
re-encode. ``to_plain``/``*_from_plain`` turn them into plain values (ints, bytes, lists, maps) for
the store and back, with the wire's strict tensor reader.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fedge_contract.broadcast.task import task_id
from fedge_contract.broadcast.wire import GlobalDelta
from fedge_contract.codecs import EncodedTensor
from fedge_contract.cohort import Participation
from fedge_contract.errors import DecodeError, Reason
from fedge_contract.messages import GlobalModel, TaskConfig, _Reader, _tensors, take_held_hash

__all__ = ["Announcement", "Broadcast", "Keyframe", "Step", "broadcast_from_plain", "keyframe_from_plain"]


@dataclass(frozen=True)
class Announcement:
    """The fields of a GlobalModel/GlobalDelta that come from the round, not from the weights."""

    fleet: str
    round: int
    deadline: float | None
    task: TaskConfig
    fingerprint: str
    final: bool = False
    # A GlobalDelta carries the task itself, or only its id (fedge_contract.broadcast.task): the
    # broadcaster inlines it in the first announcement after a start and whenever it changes.
    inline_task: bool = True
    cohort: Participation | None = None  # the round's participation (fedge_contract.cohort), as a GlobalModel carries it


@dataclass(frozen=True)
class Broadcast:
    """How version ``version`` reaches devices: in full (a keyframe), as a delta from the version before, or a hold."""

    version: int
    base_version: int | None  # None: a full model; version - 1: a delta; version: a hold (no tensors)
    tensors: tuple[EncodedTensor, ...]
    held_hash: bytes
    keyframe_version: int

    @property
    def kind(self) -> str:
        if self.base_version is None:
            return "full"
        return "hold" if self.base_version == self.version else "delta"

    @property
    def nbytes(self) -> int:
        """Bytes of tensor data (the message adds its envelope: ~200 bytes)."""
        return sum(len(t.data) for t in self.tensors)

    def message(self, about: Announcement) -> GlobalModel | GlobalDelta:
        """The announcement for ``global``: a GlobalModel for a full broadcast, else a GlobalDelta."""
        if self.base_version is None:
            return GlobalModel(
                fleet=about.fleet, model_version=self.version, round=about.round, deadline=about.deadline, task=about.task,
                fingerprint=about.fingerprint, tensors=self.tensors, final=about.final, held_hash=self.held_hash, cohort=about.cohort,
            )
        return GlobalDelta(
            fleet=about.fleet, model_version=self.version, base_version=self.base_version, round=about.round,
            deadline=about.deadline, task=about.task if about.inline_task else None, fingerprint=about.fingerprint,
            held_hash=self.held_hash, keyframe_version=self.keyframe_version, tensors=self.tensors, final=about.final,
            task_id=task_id(about.task), cohort=about.cohort,
        )

    def to_plain(self) -> dict[str, Any]:
        return {"version": self.version, "base_version": self.base_version, "held_hash": self.held_hash,
                "keyframe_version": self.keyframe_version, "tensors": [t.to_wire() for t in self.tensors]}


@dataclass(frozen=True)
class Keyframe:
    """A full model that decodes exactly to the held model of ``version``: where catch-up starts."""

    version: int
    tensors: tuple[EncodedTensor, ...]
    held_hash: bytes

    @property
    def nbytes(self) -> int:
        return sum(len(t.data) for t in self.tensors)

    def message(self, about: Announcement) -> GlobalModel:
        """The GlobalModel retained on ``global/key``: a source of weights, never an announcement to train on."""
        return GlobalModel(
            fleet=about.fleet, model_version=self.version, round=about.round, deadline=None, task=about.task,
            fingerprint=about.fingerprint, tensors=self.tensors, final=False, held_hash=self.held_hash,
        )

    def to_plain(self) -> dict[str, Any]:
        return {"version": self.version, "held_hash": self.held_hash, "tensors": [t.to_wire() for t in self.tensors]}


@dataclass(frozen=True)
class Step:
    """What one version asks the broadcaster to publish, in this order, then clear."""

    broadcast: Broadcast  # on global (retained), and also on global/delta/<version> when ``retained``
    retained: bool
    keyframe: Keyframe | None  # a new keyframe for global/key (it replaces the old one), or None
    retire: tuple[int, ...]  # retained deltas to clear from global/delta/<u>: the new keyframe covers them


def broadcast_from_plain(obj: object, where: str) -> Broadcast:
    reader = _Reader(obj, where)
    version = reader.nonneg_int("version")
    base = reader.take("base_version", int, nullable=True)
    if base is not None and base not in (version - 1, version):
        raise DecodeError(Reason.BAD_VALUE, f"{where}.base_version {base} for version {version}")
    held_hash = take_held_hash(reader, "held_hash")
    return Broadcast(version, base, _tensors(reader.take("tensors", list), where), held_hash, reader.nonneg_int("keyframe_version"))


def keyframe_from_plain(obj: object, where: str) -> Keyframe:
    reader = _Reader(obj, where)
    held_hash = take_held_hash(reader, "held_hash")
    return Keyframe(reader.nonneg_int("version"), _tensors(reader.take("tensors", list), where), held_hash)
