"""The device's side of delta broadcasts at unit level: the held model's files, and the Follower
against an in-memory stand-in for the broker's retained topics (the integration tests use Mosquitto)."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import aiomqtt
import msgpack
import numpy as np
import pytest

from edge_agent.held_model import Failed, Follower, HeldFiles, Ready, initial_rebuilder, training_model
from fedge_contract import GlobalModel, TaskConfig
from fedge_contract.broadcast import Announcement, BroadcastEncoder, BroadcastPolicy, GlobalTask, Rebuilder, Step, decode_announcement
from fedge_contract.chunks import Manifest, is_manifest
from fedge_contract.codecs import decode_weights
from fedge_contract.cohort import Participation
from fedge_contract.topics import Topics
from tests.contract.broadcast.helpers import FLEET, MAX, SPEC, initial, same_bits, walk

TOPICS = Topics(FLEET)
TASK = TaskConfig(lr=0.5, codec="flat+topk:0.1+q4+zstd")


@dataclass
class Broker:
    """Retained topics and one subscriber's queue: a subscribe delivers the matching retained messages."""

    retained: dict[str, bytes] = field(default_factory=dict)
    subscribed: list[str] = field(default_factory=list)
    messages: asyncio.Queue[aiomqtt.Message] = field(default_factory=asyncio.Queue)

    async def subscribe(self, topic: str) -> None:
        self.subscribed.append(topic)
        prefix = topic[:-1] if topic.endswith("/+") else None
        for name, payload in sorted(self.retained.items()):
            if name == topic or (prefix is not None and name.startswith(prefix) and "/" not in name[len(prefix):]):
                self.messages.put_nowait(aiomqtt.Message(name, payload, 1, True, 0, None))

    async def unsubscribe(self, topic: str) -> None:
        if topic in self.subscribed:
            self.subscribed.remove(topic)

    def publish(self, step: Step, about: Announcement, *, chunk: int | None = None) -> bytes:
        """As the Broadcaster does (without its ordering concerns): the announcement's bytes."""
        payload = step.broadcast.message(about).to_bytes()
        self.retained[TOPICS.global_task] = GlobalTask(FLEET, about.task).to_bytes()
        if step.keyframe is not None:
            self.put(TOPICS.global_keyframe, step.keyframe.message(about).to_bytes(), "keyframe", step.keyframe.version, chunk)
        if step.retained:
            self.put(TOPICS.global_delta(step.broadcast.version), payload, "delta", step.broadcast.version, chunk)
        for version in step.retire:
            self.retained.pop(TOPICS.global_delta(version), None)
        return payload

    def put(self, topic: str, payload: bytes, kind: str, version: int, chunk: int | None) -> None:
        if chunk is None or len(payload) <= chunk:
            self.retained[topic] = payload
            return
        manifest = Manifest.of(payload, fleet=FLEET, kind=kind, chunk_size=chunk, model_version=version)
        base = TOPICS.keyframe_chunks(version) if kind == "keyframe" else TOPICS.global_delta(version)
        for index in range(manifest.count):
            self.retained[f"{base}/{index}"] = payload[index * chunk : (index + 1) * chunk]
        self.retained[topic] = manifest.to_bytes()


async def pump(follower: Follower, broker: Broker) -> list[Ready | Failed]:
    """Hand the follower what the broker delivered, until nothing more comes."""
    outcomes: list[Ready | Failed] = []
    while not broker.messages.empty():
        message = broker.messages.get_nowait()
        outcomes += await follower.handle(str(message.topic), message.payload)  # type: ignore[arg-type]
    return outcomes


def about(version: int, *, inline: bool = False, task: TaskConfig = TASK) -> Announcement:
    return Announcement(FLEET, version + 1, None, task, SPEC.fingerprint, inline_task=inline or version == 0)


class Run:
    """An encoder stepping a random walk; every announcement, decoded."""

    def __init__(self, policy: BroadcastPolicy | None = None, chunk: int | None = None) -> None:
        self.rng = np.random.default_rng(0)
        self.true = initial()
        self.encoder = BroadcastEncoder(SPEC, policy or BroadcastPolicy(chain="flat+topk:0.3+q8+zstd", every=30, ratio=None))
        self.broker = Broker()
        self.chunk = chunk
        self.announced = [self.announce(self.encoder.begin(self.true, 0, devices_hold=True), 0)]

    def announce(self, step: Step, version: int, **kw: Any) -> Any:
        return decode_announcement(self.broker.publish(step, about(version, **kw), chunk=self.chunk), max_bytes=MAX, fleet=FLEET)

    def next(self, **kw: Any) -> Any:
        self.true = walk(self.true, self.rng)
        version = self.encoder.version + 1
        self.announced.append(self.announce(self.encoder.advance(self.true, version), version, **kw))
        return self.announced[-1]


def follower(broker: Broker, rebuilder: Rebuilder | None = None, *, task: TaskConfig | None = None, **kw: Any) -> Follower:
    return Follower(broker, TOPICS, rebuilder or Rebuilder.from_build(SPEC, initial()), task=task, max_bytes=MAX, **kw)  # type: ignore[arg-type]


def holds(outcomes: list[Ready | Failed], run: Run) -> Ready:
    assert len(outcomes) == 1 and isinstance(outcomes[0], Ready), outcomes
    ready = outcomes[0]
    assert ready.held.version == run.encoder.version and ready.held.digest == run.encoder.held_hash
    assert same_bits(dict(ready.held.weights), dict(run.encoder.held))
    return ready


async def test_a_follower_accepts_each_version_and_trains_from_the_held_weights() -> None:
    run = Run()
    device = follower(run.broker)
    holds(await device.offer(run.announced[0]), run)
    for _ in range(3):
        ready = holds(await device.offer(run.next()), run)
    assert ready.task == TASK and not run.broker.subscribed  # the task came inline with v0, kept since
    model = ready.model
    assert isinstance(model, GlobalModel) and model.model_version == 3 and model.round == 4 and model.held_hash == ready.held.digest
    assert same_bits(decode_weights(model.tensors, SPEC), dict(ready.held.weights))  # float32: exactly the held model
    assert device.stats.accepted == 4 and device.stats.caught_up == 0


async def test_a_gap_is_bridged_by_the_retained_deltas_and_the_topics_are_left() -> None:
    run = Run()
    device = follower(run.broker, task=TASK)
    holds(await device.offer(run.announced[0]), run)
    run.next()
    run.next()
    assert await device.offer(run.next()) == []  # holds v0, v3 applies to v2
    assert sorted(run.broker.subscribed) == [TOPICS.global_delta(1), TOPICS.global_delta(2)]
    holds(await pump(device, run.broker), run)
    assert run.broker.subscribed == [] and device.stats.caught_up == 1 and device.stats.refusals == ["base_mismatch"]
    assert device.stats.bytes == sum(len(run.broker.retained[TOPICS.global_delta(u)]) for u in (1, 2))


async def test_a_new_device_without_a_build_catches_up_from_chunked_keyframe_and_deltas() -> None:
    run = Run(BroadcastPolicy(chain="flat+q8+zstd", every=2, ratio=None), chunk=128)  # keyframes at 0 and 2
    for _ in range(3):
        run.next()
    assert is_manifest(run.broker.retained[TOPICS.global_keyframe]) and is_manifest(run.broker.retained[TOPICS.global_delta(3)])
    device = follower(run.broker, Rebuilder(SPEC))
    assert await device.offer(run.announced[-1]) == []
    outcomes = await pump(device, run.broker)
    ready = holds(outcomes, run)
    assert ready.task == TASK and device.stats.caught_up == 1  # v3 only named the task: fetched from global/task
    assert device.stats.bytes > len(run.broker.retained[f"{TOPICS.keyframe_chunks(2)}/0"]) * 3
    assert run.broker.subscribed == []


async def test_a_damaged_announcement_falls_back_to_the_keyframe_and_its_retained_copy(caplog: pytest.LogCaptureFixture) -> None:
    run = Run()
    device = follower(run.broker)
    holds(await device.offer(run.announced[0]), run)
    good = run.next()
    damaged = replace(good, held_hash=b"\7" * 16)
    with caplog.at_level(logging.WARNING, "fedge.agent.held"):
        assert await device.offer(damaged) == []
    assert "refused broadcast v1 (hash_mismatch" in caplog.text and "falling back to the full model: keyframe v0 + delta v1" in caplog.text
    ready = holds(await pump(device, run.broker), run)
    assert ready.announcement is damaged and device.stats.fell_back == 1


async def test_a_catch_up_whose_topics_stay_silent_fails_with_a_reason_after_its_timeout() -> None:
    run = Run()
    run.next()
    run.next()
    del run.broker.retained[TOPICS.global_delta(1)]
    now = [0.0]
    device = follower(run.broker, task=TASK, timeout=5.0, clock=lambda: now[0])
    assert await device.offer(run.announced[-1]) == []
    assert await pump(device, run.broker) == []  # delta 1 never comes
    now[0] = 6.0
    assert await device.handle("$fedge/chunks/expired", b"") == []  # -> the keyframe path (keyframe v0 + delta 1)
    assert TOPICS.global_keyframe in run.broker.subscribed
    await pump(device, run.broker)
    now[0] = 12.0
    outcomes = await device.handle("$fedge/chunks/expired", b"")
    assert len(outcomes) == 1 and isinstance(outcomes[0], Failed) and outcomes[0].error.reason.value == "incomplete"
    assert "global/delta/1" in str(outcomes[0].error) and run.broker.subscribed == [] and device.held is not None
    assert device.held.version == 0 and device.stats.failed == 1


async def test_stray_and_cleared_messages_change_nothing() -> None:
    run = Run()
    device = follower(run.broker)
    assert device.owns(TOPICS.global_delta(4)) and device.owns(TOPICS.global_task) and device.owns(f"{TOPICS.global_keyframe}/3/0")
    assert not device.owns(TOPICS.global_model) and not device.owns(f"{TOPICS.global_model}/3/0")
    run.broker.subscribed.append(TOPICS.global_delta(4))  # left by an earlier run in its persistent session
    assert await device.handle(TOPICS.global_delta(4), b"x") == [] and run.broker.subscribed == []
    assert await device.handle(TOPICS.global_delta(5), b"") == []


async def test_a_task_that_moved_on_fails_the_version_until_the_next_announcement() -> None:
    run = Run()
    device = follower(run.broker, Rebuilder.from_build(SPEC, initial()))
    holds(await device.offer(run.announced[0]), run)
    device.task = None  # lost (a device that kept only its weights)
    announced = run.next()
    run.broker.retained[TOPICS.global_task] = GlobalTask(FLEET, TaskConfig(lr=0.01)).to_bytes()
    assert await device.offer(announced) == [] and run.broker.subscribed == [TOPICS.global_task]
    outcomes = await pump(device, run.broker)
    assert len(outcomes) == 1 and isinstance(outcomes[0], Failed) and outcomes[0].error.reason.value == "bad_value"
    assert device.held is not None and device.held.version == 1  # the weights moved on; the task is what is missing


async def test_a_plain_full_model_is_not_the_followers() -> None:
    run = Run()
    plain = GlobalModel(FLEET, 0, 1, None, TASK, SPEC.fingerprint, ())
    with pytest.raises(ValueError):
        await follower(run.broker).offer(plain)


def test_held_files_keep_the_model_and_task_and_refuse_what_is_not_theirs(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    files = HeldFiles(tmp_path, SPEC)
    assert files.load() is None
    rebuilder = Rebuilder.from_build(SPEC, initial())
    (tmp_path / "held-0123456789abcdef.state").write_bytes(b"another model's")
    assert files.save(rebuilder, TASK) and not files.save(rebuilder, TASK)  # the second: already on disk
    assert [p.name for p in tmp_path.iterdir()] == [files.path.name]
    kept = HeldFiles(tmp_path, SPEC).load()
    assert kept is not None and kept[1] == TASK and kept[0].held is not None and rebuilder.held is not None
    assert kept[0].held.digest == rebuilder.held.digest and same_bits(dict(kept[0].held.weights), dict(rebuilder.held.weights))
    state = msgpack.unpackb(files.path.read_bytes(), raw=False)
    for broken in (b"\xc1garbage", msgpack.packb({**state, "format": 9}),
                   msgpack.packb({**state, "rebuilder": {**state["rebuilder"], "held_hash": b"\0" * 16}}),
                   msgpack.packb({**state, "task": {"lr": -1.0}}), msgpack.packb([1, 2])):
        files.path.write_bytes(broken)
        with caplog.at_level(logging.WARNING, "fedge.agent.held"):
            assert HeldFiles(tmp_path, SPEC).load() is None
        assert "ignoring the held model" in caplog.text
        caplog.clear()


def test_the_starting_point_is_the_kept_model_else_the_own_build() -> None:
    built, task = initial_rebuilder(SPEC, None, initial())
    assert built.held is not None and built.held.version == 0 and task is None
    assert initial_rebuilder(SPEC, None, None)[0].held is None
    kept = (Rebuilder(SPEC), TASK)
    assert initial_rebuilder(SPEC, kept, initial()) is kept


def test_training_model_names_the_held_version() -> None:
    rebuilder = Rebuilder.from_build(SPEC, initial())
    assert rebuilder.held is not None
    cohort = Participation(eval_threshold=5)
    announcement = GlobalModel(FLEET, 0, 7, 123.0, TASK, SPEC.fingerprint, (), final=True, held_hash=rebuilder.held.digest, cohort=cohort)
    model = training_model(announcement, rebuilder.held, TASK)
    assert (model.round, model.deadline, model.final, model.task, model.cohort) == (7, 123.0, True, TASK, cohort)
    assert GlobalModel.from_bytes(model.to_bytes(), max_bytes=MAX) == model
