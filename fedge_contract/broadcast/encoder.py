"""The aggregator's side: each new version as a compressed delta, with server-side error feedback.

The encoder keeps ``held``, the model every device holds: exactly the sum of the decoded
broadcasts since the last keyframe (held.apply_delta), starting from the decoded keyframe. For
version ``v`` it encodes ``true_v - held_{v-1}`` (float32) with the delta chain and advances
``held`` by what devices will decode from it. What the chain leaves out is not lost: it stays in
``true - held`` and rides the next broadcast (error feedback, as agents do for their uploads).

The math with the aggregator (DESIGN: round ``r`` trains on version ``r-1`` and makes version ``r``):

    devices train from held_{v-1} and send  d_i = local_i - held_{v-1}
    the aggregator folds the d_i (base_version v-1: against the same model) into the mean  m_v
    the strategy steps the TRUE model:      true_v = strategy(true_{v-1}, m_v)
    the broadcast carries                   B_v = encode(true_v - held_{v-1})
    devices and server both do              held_v = held_{v-1} + decode(B_v)

so ``true_v - held_v`` is only what the last broadcast could not carry, and it is sent next
time: nothing is lost over rounds. The strategy never sees ``held``; it advances the true model by
the pseudo-gradient measured at the model devices hold (as async mode applies gradients measured
at older versions). The checkpoint keeps the true model; ``held`` is what devices run.

Each ``advance`` returns a Step: the broadcast to announce, maybe a new keyframe, and the retained
deltas it retires. Its state is plain values (``to_state``/``from_state``), so a restarted
aggregator resumes exactly, re-announces the same bytes and republishes what catch-up needs.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from fedge_contract.broadcast.held import Weights, apply_delta, check_spec, decode_full, held_digest, join_weights, split_weights
from fedge_contract.broadcast.policy import SNAPSHOT_CHAIN, BroadcastPolicy
from fedge_contract.broadcast.records import Broadcast, Keyframe, Step, broadcast_from_plain, keyframe_from_plain
from fedge_contract.codecs import encode_weights, fitted_to, parse_chain
from fedge_contract.errors import DecodeError, Reason
from fedge_contract.messages import _Reader
from fedge_contract.tensors import ModelSpec

__all__ = ["STATE_FORMAT", "BroadcastEncoder"]

STATE_FORMAT = 1
_DELTA_STREAM, _KEYFRAME_STREAM = 0xB0, 0x4B  # separate random streams, per version, for the two encodes


class BroadcastEncoder:
    """Turns each new true model into the broadcast of its version, keeping ``held`` in step with devices."""

    def __init__(self, spec: ModelSpec, policy: BroadcastPolicy) -> None:
        check_spec(spec)
        self.spec = spec
        self.policy = policy
        self._held: Weights = {}
        self._keyframe: Keyframe | None = None
        self._retained: list[Broadcast] = []  # the deltas after the keyframe, oldest first
        self._latest: Broadcast | None = None
        self._keyframe_due = False

    # ------------------------------------------------------------------ what devices hold
    @property
    def version(self) -> int:
        return self.latest.version

    @property
    def held(self) -> Mapping[str, np.ndarray]:
        """The model devices hold at ``version``."""
        self._begun()
        return self._held

    @property
    def held_hash(self) -> bytes:
        return self.latest.held_hash

    @property
    def latest(self) -> Broadcast:
        """The broadcast of the current version: what to (re-)announce on ``global``."""
        return self._begun()[0]

    @property
    def keyframe(self) -> Keyframe:
        """The keyframe catch-up starts from: what ``global/key`` must hold."""
        return self._begun()[1]

    @property
    def retained(self) -> tuple[Broadcast, ...]:
        """The deltas after the keyframe, oldest first: what ``global/delta/<u>`` must hold."""
        return tuple(self._retained)

    def request_keyframe(self) -> None:
        """Take a keyframe at the next version (on demand: many devices catching up, an operator's wish)."""
        self._keyframe_due = True

    @property
    def keyframe_requested(self) -> bool:
        """A keyframe was asked for and not taken yet (part of the state)."""
        return self._keyframe_due

    # ------------------------------------------------------------------ versions
    def begin(self, weights: Mapping[str, np.ndarray], version: int, *, devices_hold: bool = False) -> Step:
        """The first broadcast: of a new run, or of an aggregator that has no broadcast state to resume.

        ``devices_hold=True`` says every device already holds ``weights`` bit for bit (the task's
        initial model, which both sides build from its seed): the broadcast is a *hold*, a message
        without tensors whose hash each device checks against its own build, and the keyframe a
        lossless snapshot for devices whose build differs. Otherwise the broadcast is a full
        keyframe in the keyframe chain (with a lossy one, held is the decoded keyframe).
        """
        if self._latest is not None:
            raise RuntimeError(f"the encoder already broadcast version {self._latest.version}")
        true = self._checked(weights)
        if not devices_hold:
            return self._reset(true, version)
        held = {name: values.copy() for name, values in true.items()}
        digest = held_digest(held, self.spec)
        keyframe = self._encode_keyframe(held, version, SNAPSHOT_CHAIN if self.policy.resets else self.policy.keyframe_chain)
        return self._commit(held, Broadcast(version, version, (), digest, version), keyframe, retained=False)

    def advance(self, weights: Mapping[str, np.ndarray], version: int) -> Step:
        """The broadcast of ``version`` (the one after the current) for the true model ``weights``."""
        latest, keyframe = self._begun()
        if version != latest.version + 1:
            raise ValueError(f"version {version} does not follow the broadcast version {latest.version}")
        true = self._checked(weights)
        due = self._keyframe_is_due(version, keyframe)
        if due and self.policy.resets:
            return self._reset(true, version)
        residual = {name: np.subtract(true[name], self._held[name], dtype=np.float32) for name in true}
        chain = fitted_to(self.policy.delta_chain, residual)  # a version that changed few weights sends no zeros
        tensors = encode_weights(residual, chain, self._rng(version, _DELTA_STREAM))
        held = apply_delta(self._held, tensors, self.spec)
        digest = held_digest(held, self.spec)
        if due:  # a snapshot: followers apply this delta, catch-up starts from the copy
            snapshot = self._encode_keyframe(held, version, self.policy.keyframe_chain)
            return self._commit(held, Broadcast(version, version - 1, tensors, digest, version), snapshot, retained=False)
        return self._commit(held, Broadcast(version, version - 1, tensors, digest, keyframe.version), None, retained=True)

    def _reset(self, true: Weights, version: int) -> Step:
        keyframe = self._encode_keyframe(true, version, self.policy.keyframe_chain)
        broadcast = Broadcast(version, None, keyframe.tensors, keyframe.held_hash, version)
        return self._commit(decode_full(keyframe.tensors, self.spec), broadcast, keyframe, retained=False)

    def _encode_keyframe(self, weights: Weights, version: int, chain: str) -> Keyframe:
        tensors = encode_weights(weights, parse_chain(chain), self._rng(version, _KEYFRAME_STREAM))
        return Keyframe(version, tensors, held_digest(decode_full(tensors, self.spec), self.spec))

    def _commit(self, held: Weights, broadcast: Broadcast, keyframe: Keyframe | None, *, retained: bool) -> Step:
        retire: tuple[int, ...] = ()
        if keyframe is not None:
            if keyframe.held_hash != broadcast.held_hash:  # a snapshot chain that is not lossless: a bug, not input
                raise AssertionError(f"keyframe v{keyframe.version} does not decode to the held model")
            retire = tuple(b.version for b in self._retained)
            self._retained, self._keyframe, self._keyframe_due = [], keyframe, False
        elif retained:
            self._retained.append(broadcast)
        self._held, self._latest = held, broadcast
        return Step(broadcast, retained, keyframe, retire)

    def _keyframe_is_due(self, version: int, keyframe: Keyframe) -> bool:
        if self._keyframe_due or version - keyframe.version >= self.policy.every:
            return True
        ratio = self.policy.ratio
        return ratio is not None and sum(b.nbytes for b in self._retained) >= ratio * keyframe.nbytes

    def _rng(self, version: int, stream: int) -> np.random.Generator:
        return np.random.default_rng([self.policy.seed, version, stream])

    def _checked(self, weights: Mapping[str, np.ndarray]) -> Weights:
        extra = set(weights) - {t.name for t in self.spec.tensors}
        if extra:
            raise ValueError(f"the model to broadcast has tensors the spec does not: {sorted(extra)[:5]}")
        out: Weights = {}
        for t in self.spec.tensors:
            values = np.ascontiguousarray(weights[t.name], dtype=np.float32)
            if values.shape != t.shape:
                raise ValueError(f"tensor {t.name!r} has shape {values.shape}, the model has {t.shape}")
            if not np.isfinite(values).all():
                raise ValueError(f"tensor {t.name!r} of the model to broadcast holds NaN or Inf")
            out[t.name] = values
        return out

    def _begun(self) -> tuple[Broadcast, Keyframe]:
        if self._latest is None or self._keyframe is None:
            raise RuntimeError("the encoder has not begun: call begin() first")
        return self._latest, self._keyframe

    # ------------------------------------------------------------------ persistence
    def to_state(self) -> dict[str, Any]:
        """The broadcast state as plain values (ints, bytes, lists, maps): what the store keeps.

        ``held`` is the model's float32 bytes in spec order (the bytes its hash covers). The true
        model is not here: it is the aggregator's checkpoint of the same version, which the store
        must commit in the same transaction, before the broadcast is published.
        """
        latest, keyframe = self._begun()
        return {
            "format": STATE_FORMAT,
            "fingerprint": self.spec.fingerprint,
            "held": join_weights(self._held, self.spec),
            "latest": latest.to_plain(),
            "keyframe": keyframe.to_plain(),
            "retained": [b.to_plain() for b in self._retained],
            "keyframe_due": self._keyframe_due,
        }

    @classmethod
    def from_state(cls, state: object, spec: ModelSpec, policy: BroadcastPolicy) -> BroadcastEncoder:
        """Resume from ``to_state`` values (the policy may have changed: it applies from the next version).

        Raises DecodeError for state that is broken or another model's: the held model must match
        its hash, and the keyframe plus the retained deltas must rebuild it, exactly as a device
        catching up would, so a resumed aggregator never serves a catch-up chain that fails.
        """
        encoder = cls(spec, policy)
        reader = _Reader(state, "broadcast state")
        if reader.take("format", int) != STATE_FORMAT:
            raise DecodeError(Reason.SCHEMA, f"broadcast state format {reader.obj.get('format')!r} is not {STATE_FORMAT}")
        if reader.take("fingerprint", str) != spec.fingerprint:
            raise DecodeError(Reason.FINGERPRINT, "broadcast state of another model architecture")
        held = split_weights(reader.take("held", bytes), spec, "broadcast state.held")
        latest = broadcast_from_plain(reader.take("latest", dict), "broadcast state.latest")
        keyframe = keyframe_from_plain(reader.take("keyframe", dict), "broadcast state.keyframe")
        retained = [broadcast_from_plain(b, f"broadcast state.retained[{i}]") for i, b in enumerate(reader.take("retained", list))]
        if held_digest(held, spec) != latest.held_hash:
            raise DecodeError(Reason.HASH_MISMATCH, f"broadcast state: the held model of v{latest.version} does not match its hash")
        _check_chain(keyframe, retained, latest, spec)
        encoder._held, encoder._latest, encoder._keyframe, encoder._retained = held, latest, keyframe, retained
        encoder._keyframe_due = reader.take("keyframe_due", bool)
        return encoder


def _check_chain(keyframe: Keyframe, retained: list[Broadcast], latest: Broadcast, spec: ModelSpec) -> None:
    """The keyframe plus the retained deltas must rebuild the latest held model (what catch-up does)."""
    model = decode_full(keyframe.tensors, spec)
    if held_digest(model, spec) != keyframe.held_hash:
        raise DecodeError(Reason.HASH_MISMATCH, f"broadcast state: keyframe v{keyframe.version} does not match its hash")
    version = keyframe.version
    for delta in retained:
        if delta.base_version != version or delta.version != version + 1:
            raise DecodeError(Reason.BAD_VALUE, f"broadcast state: retained v{delta.version} does not follow v{version}")
        model, version = apply_delta(model, delta.tensors, spec), delta.version
        if held_digest(model, spec) != delta.held_hash:
            raise DecodeError(Reason.HASH_MISMATCH, f"broadcast state: retained delta v{delta.version} does not rebuild its hash")
    if version != latest.version or (retained and retained[-1] != latest) or held_digest(model, spec) != latest.held_hash:
        raise DecodeError(Reason.BAD_VALUE, f"broadcast state: keyframe v{keyframe.version} and its deltas do not make v{latest.version}")
