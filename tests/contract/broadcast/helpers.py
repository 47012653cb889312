"""Small models, random walks and a pure in-memory stand-in for the broker's retained topics."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from fedge_contract.broadcast import Announcement, GlobalDelta, Rebuilder, Step, decode_announcement
from fedge_contract.codecs import decode_weights
from fedge_contract.errors import DecodeError
from fedge_contract.messages import GlobalModel, TaskConfig
from fedge_contract.tensors import ModelSpec, TensorSpec
from fedge_contract.topics import Topics

FLEET = "f1"
TOPICS = Topics(FLEET)
MAX = 1 << 26
SPEC = ModelSpec((TensorSpec("layer.weight", (12, 7)), TensorSpec("layer.bias", (12,)), TensorSpec("head.weight", (3, 12))))


def initial(seed: int = 0, spec: ModelSpec = SPEC) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {t.name: (rng.standard_normal(t.shape) * 0.1).astype(np.float32) for t in spec.tensors}


def walk(weights: dict[str, np.ndarray], rng: np.random.Generator, scale: float = 0.01) -> dict[str, np.ndarray]:
    """The true model's next version: a random step, as a strategy's would be."""
    return {name: (values + rng.standard_normal(values.shape) * scale).astype(np.float32) for name, values in weights.items()}


def about(version: int, spec: ModelSpec = SPEC) -> Announcement:
    return Announcement(FLEET, version + 1, 1_700_000_000.5, TaskConfig(), spec.fingerprint)


def same_bits(a: dict[str, np.ndarray] | object, b: dict[str, np.ndarray] | object) -> bool:
    assert isinstance(a, dict) and isinstance(b, dict)
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and a[k].tobytes() == b[k].tobytes() for k in a)


@dataclass
class Retained:
    """The retained messages of one fleet's global topics, as a Step tells the broadcaster to publish them."""

    topics: dict[str, bytes] = field(default_factory=dict)

    def publish(self, step: Step, spec: ModelSpec = SPEC) -> bytes:
        info = about(step.broadcast.version, spec)
        payload = step.broadcast.message(info).to_bytes()
        self.topics[TOPICS.global_model] = payload
        if step.retained:
            self.topics[TOPICS.global_delta(step.broadcast.version)] = payload
        if step.keyframe is not None:
            self.topics[TOPICS.global_keyframe] = step.keyframe.message(info).to_bytes()
        for version in step.retire:
            del self.topics[TOPICS.global_delta(version)]
        return payload

    def fetch(self, topic: str) -> bytes | None:
        return self.topics.get(topic)


def follow(device: Rebuilder, payload: bytes, broker: Retained) -> tuple[str, int]:
    """What an agent does with an announcement: accept it, else catch up as ``recovery`` says.

    Returns (how, bytes fetched for catch-up): how is "accepted", "caught-up" or "gave-up".
    """
    message = decode_announcement(payload, max_bytes=MAX, fleet=FLEET)
    try:
        device.accept(message)
        return "accepted", 0
    except DecodeError as exc:
        error = exc
    fetched = 0
    plan = device.recovery(message, error)
    while plan is not None:
        keyframe, deltas = None, {}
        if plan.keyframe is not None:
            blob = broker.fetch(TOPICS.global_keyframe)
            if blob is not None:
                fetched += len(blob)
                keyframe = GlobalModel.from_bytes(blob, max_bytes=MAX, fleet=FLEET)
        for version in plan.deltas:
            blob = broker.fetch(TOPICS.global_delta(version))
            if blob is not None:
                fetched += len(blob)
                deltas[version] = GlobalDelta.from_bytes(blob, max_bytes=MAX, fleet=FLEET)
        try:
            device.catch_up(message, plan, keyframe, deltas)
            return ("caught-up from the keyframe" if plan.keyframe is not None else "caught-up from deltas"), fetched
        except DecodeError as exc:
            plan = device.recovery(message, exc, plan)
    return "gave-up", fetched


def decoded(message: GlobalModel, spec: ModelSpec = SPEC) -> dict[str, np.ndarray]:
    return decode_weights(message.tensors, spec)
