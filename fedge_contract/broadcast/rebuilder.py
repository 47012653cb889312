"""The device's side: the model it holds, advanced by each broadcast, and catch-up when it cannot be.

A device holds one model (``Held``: version, weights, hash). An announcement on ``global`` moves
it on (``accept``) when it can: a full model always can, a delta only if it applies to the version
held and the result hashes to the broadcast's ``held_hash``. Otherwise ``accept`` refuses with a
DecodeError whose reason says why (``base_mismatch``: a gap, a new or restarted device;
``hash_mismatch``; a malformed delta's own reason), the held model stays as it was, and the
device catches up: ``plan`` says what to fetch, ``catch_up`` rebuilds from it.

Catch-up never replays history. The aggregator retains a keyframe (``global/key``: a full model
that decodes to the held model of its version ``k``) and the deltas after it (``global/delta/<u>``
for ``k < u <= v``). A device that holds a version ``h`` with ``k <= h < v`` fetches only the
deltas ``h+1 .. v-1`` (the announcement is delta ``v``); any other device fetches the keyframe and
the deltas ``k+1 .. v-1``. If a delta-only catch-up fails its hashes (the device's model was from
another chain: an aggregator that started over), ``plan(..., trust_held=False)`` gives the keyframe
path. A device starts (version 0) from its own build of the task's model (``Rebuilder.from_build``),
which the first broadcast's hash confirms or refutes.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from fedge_contract.broadcast.held import Weights, apply_delta, check_spec, decode_full, held_digest, join_weights, split_weights
from fedge_contract.broadcast.wire import GlobalDelta
from fedge_contract.codecs import EncodedTensor
from fedge_contract.errors import DecodeError, Reason
from fedge_contract.messages import GlobalModel, _Reader, take_held_hash
from fedge_contract.tensors import ModelSpec
from fedge_contract.topics import Topics

__all__ = ["CatchUp", "Held", "Rebuilder"]

STATE_FORMAT = 1
Announced = GlobalModel | GlobalDelta


@dataclass(frozen=True)
class Held:
    """A model as a device holds it; ``digest`` is ``held_digest(weights)``."""

    version: int
    weights: Mapping[str, np.ndarray]
    digest: bytes


@dataclass(frozen=True)
class CatchUp:
    """What to fetch before an announcement can be applied."""

    keyframe: int | None  # the keyframe version to fetch from global/key, or None: start from the held model
    deltas: tuple[int, ...]  # versions to fetch from global/delta/<u>, applied in this order, then the announcement

    @property
    def needed(self) -> bool:
        return self.keyframe is not None or bool(self.deltas)

    def topics(self, topics: Topics) -> list[str]:
        """The retained topics to subscribe to (each delivers its one retained message)."""
        return ([topics.global_keyframe] if self.keyframe is not None else []) + [topics.global_delta(u) for u in self.deltas]


class Rebuilder:
    """The model one device holds, kept in step with the aggregator's broadcasts."""

    def __init__(self, spec: ModelSpec, held: Held | None = None) -> None:
        check_spec(spec)
        self.spec = spec
        self.held = held

    @classmethod
    def from_build(cls, spec: ModelSpec, weights: Mapping[str, np.ndarray]) -> Rebuilder:
        """A new device: it holds version 0 as its own build of the task's model (unconfirmed until a broadcast's hash agrees)."""
        held = {t.name: np.array(weights[t.name], dtype=np.float32) for t in spec.tensors}
        return cls(spec, Held(0, held, held_digest(held, spec)))

    # ------------------------------------------------------------------ one announcement
    def accept(self, message: Announced) -> Held:
        """Move to ``message``'s version; DecodeError (held unchanged) when it cannot be applied here."""
        self._check_fingerprint(message)
        held = self._next(self.held, message)
        self.held = held
        return held

    def plan(self, message: Announced, *, trust_held: bool = True) -> CatchUp:
        """What to fetch to reach ``message``'s version (nothing for a full model or an applicable delta).

        ``trust_held=False``: the held model is not on this broadcast's chain (its delta did not
        rebuild the hash, or a delta-only catch-up failed), so start from the keyframe.
        """
        if isinstance(message, GlobalModel):
            return CatchUp(None, ())
        k, base = message.keyframe_version, message.base_version
        if trust_held and self.held is not None and k <= self.held.version <= base:
            return CatchUp(None, tuple(range(self.held.version + 1, base + 1)))
        return CatchUp(k, tuple(range(k + 1, base + 1)))

    def recovery(self, message: Announced, error: DecodeError, tried: CatchUp | None = None) -> CatchUp | None:
        """The catch-up to try after ``accept`` (``tried=None``) or ``catch_up(tried)`` refused ``message``; None: give up.

        A gap (``base_mismatch``) is bridged by retained deltas when the device holds a version
        since the keyframe; any other refusal, or a failed delta-only catch-up, falls back to the
        keyframe (the full model); a failed keyframe catch-up, or a full announcement that does
        not decode, leaves nothing to try until the next announcement.
        """
        if isinstance(message, GlobalModel) or (tried is not None and tried.keyframe is not None):
            return None
        if tried is None and error.reason is Reason.BASE_MISMATCH:
            return self.plan(message, trust_held=True)
        return self.plan(message, trust_held=False)

    def catch_up(self, message: Announced, plan: CatchUp, keyframe: GlobalModel | None, deltas: Mapping[int, GlobalDelta]) -> Held:
        """Rebuild ``message``'s version from what ``plan`` fetched; DecodeError (held unchanged) on any gap or mismatch."""
        self._check_fingerprint(message)
        start = self.held
        if plan.keyframe is not None:
            start = self._keyframe(keyframe, plan.keyframe)
        chain: list[Announced] = []
        for version in plan.deltas:
            delta = deltas.get(version)
            if delta is None:
                raise DecodeError(Reason.INCOMPLETE, f"catch-up to v{message.model_version}: the retained delta v{version} is missing")
            if delta.model_version != version:
                raise DecodeError(Reason.BAD_VALUE, f"catch-up: global/delta/{version} holds v{delta.model_version}")
            self._check_fingerprint(delta)
            chain.append(delta)
        steps = [*chain, message]
        held = self._next(start, steps[0])
        for step in steps[1:]:
            held = self._next(held, step)
        self.held = held
        return held

    # ------------------------------------------------------------------ the rule
    def _next(self, held: Held | None, message: Announced) -> Held:
        version = message.model_version
        if held is not None and held.version == version and held.digest == message.held_hash:
            return held  # already there: a re-announcement (a new deadline), or a reconnect's retained copy
        if isinstance(message, GlobalModel):
            return self._full(message.tensors, version, message.held_hash, "global model")
        if held is None or held.version != message.base_version:
            has = "no model" if held is None else f"v{held.version}"
            raise DecodeError(Reason.BASE_MISMATCH, f"delta v{version} applies to v{message.base_version}; this device holds {has}")
        weights = held.weights if message.is_hold else apply_delta(held.weights, message.tensors, self.spec)
        digest = held.digest if message.is_hold else held_digest(weights, self.spec)
        if digest != message.held_hash:
            raise DecodeError(Reason.HASH_MISMATCH, f"the model rebuilt for v{version} does not match the broadcast's hash")
        return Held(version, weights, digest)

    def _keyframe(self, keyframe: GlobalModel | None, version: int) -> Held:
        if keyframe is None:
            raise DecodeError(Reason.INCOMPLETE, f"catch-up needs keyframe v{version}, and none was fetched")
        if keyframe.model_version != version:
            raise DecodeError(Reason.BAD_VALUE, f"catch-up needs keyframe v{version}; global/key holds v{keyframe.model_version}")
        if keyframe.held_hash is None:
            raise DecodeError(Reason.MISSING_FIELD, f"keyframe v{version} carries no held_hash")
        self._check_fingerprint(keyframe)
        return self._full(keyframe.tensors, version, keyframe.held_hash, "keyframe")

    def _full(self, tensors: tuple[EncodedTensor, ...], version: int, expected: bytes | None, what: str) -> Held:
        weights = decode_full(tensors, self.spec)
        digest = held_digest(weights, self.spec)
        if expected is not None and digest != expected:
            raise DecodeError(Reason.HASH_MISMATCH, f"{what} v{version} does not decode to the model its hash names")
        return Held(version, weights, digest)

    def _check_fingerprint(self, message: Announced) -> None:
        if message.fingerprint != self.spec.fingerprint:
            raise DecodeError(Reason.FINGERPRINT, f"v{message.model_version} is for architecture {message.fingerprint}, "
                                                  f"this device's model is {self.spec.fingerprint}")

    # ------------------------------------------------------------------ persistence (the agent's state folder)
    def to_state(self) -> dict[str, Any] | None:
        """The held model as plain values, or None before any; restoring it spares a restarted device a catch-up."""
        if self.held is None:
            return None
        return {"format": STATE_FORMAT, "fingerprint": self.spec.fingerprint, "version": self.held.version,
                "held": join_weights(self.held.weights, self.spec), "held_hash": self.held.digest}

    @classmethod
    def from_state(cls, state: object, spec: ModelSpec) -> Rebuilder:
        """Inverse of ``to_state``; DecodeError for another model's or a corrupt state (the device then catches up)."""
        if state is None:
            return cls(spec)
        reader = _Reader(state, "held state")
        if reader.take("format", int) != STATE_FORMAT:
            raise DecodeError(Reason.SCHEMA, f"held state format {reader.obj.get('format')!r} is not {STATE_FORMAT}")
        if reader.take("fingerprint", str) != spec.fingerprint:
            raise DecodeError(Reason.FINGERPRINT, "held state of another model architecture")
        weights: Weights = split_weights(reader.take("held", bytes), spec, "held state.held")
        digest = take_held_hash(reader, "held_hash")
        if held_digest(weights, spec) != digest:
            raise DecodeError(Reason.HASH_MISMATCH, "held state: the weights do not match their hash")
        return cls(spec, Held(reader.nonneg_int("version"), weights, digest))
