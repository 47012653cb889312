"""Delta broadcasts end to end without the round loop: a Broadcaster, a real Mosquitto, real agents.

The test plays the coordinator: it steps a true model, lets the Broadcaster encode and publish
each version (committing its state to SQLite first, as the store will), and waits until every
running agent trained on the version, which it can only do once it holds it: the update's
base_version says which version, and the agent's held model must be the Broadcaster's bit for bit.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from collections.abc import AsyncIterator, Iterable
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest

from aggregator.broadcasting.broadcaster import Broadcaster
from aggregator.store import broadcast as broadcast_store
from edge_agent import Agent
from fedge.simulate.wiretap import WireTap
from fedge_contract import GlobalModel, Presence, RoundState, RoundStatus, TaskConfig, Topics, Update, compact
from fedge_contract.broadcast import BroadcastPolicy, Step, decode_announcement
from fedge_contract.chunks import Manifest, is_manifest
from fedge_contract.cohort import InviteSet, Participation
from fedge_contract.mqtt import BrokerAddress, Connection
from fedge_contract.tensors import ModelSpec
from fedge_tasks import load_task
from fedge_tasks.weights import get_weights
from tests.integration.fleet import DIGITS_5, RawPeer, agent_config, check_held, raw_peer

pytestmark = pytest.mark.integration

TASK = TaskConfig(local_epochs=1, batch_size=32, lr=0.05, codec="flat+topk:0.05+q4+zstd")


class Coordinator:
    """What the lead's coordinator will do with a Broadcaster, minus the rounds: step, commit, publish."""

    def __init__(self, address: BrokerAddress, fleet: str, root: Path, policy: BroadcastPolicy, *, max_message_bytes: int = 8 << 20) -> None:
        self.address, self.topics, self.policy, self.max_message_bytes = address, Topics(fleet), policy, max_message_bytes
        self.db = sqlite3.connect(root / "broadcast.sqlite")
        broadcast_store.create(self.db)
        self.true = get_weights(load_task("digits", DIGITS_5).build_model())  # version 0, as every device builds it
        self.spec = ModelSpec.of(self.true)
        self.rng = np.random.default_rng(7)
        self.task = TASK
        self.conn: Connection | None = None
        self.broadcaster: Broadcaster | None = None

    @contextlib.asynccontextmanager
    async def connected(self, *, resume: bool, link: type[Connection] = Connection) -> AsyncIterator[Broadcaster]:
        async with link(self.address, f"broadcaster-{self.topics.fleet}", subscriptions=[], persistent=False) as conn:
            self.conn = conn
            if resume:
                assert self.broadcaster is not None
                state = broadcast_store.load(self.db, self.broadcaster.version)
                assert state is not None
                self.broadcaster = Broadcaster.from_state(conn, self.topics, self.spec, self.policy, state,
                                                          max_message_bytes=self.max_message_bytes)
                await self.broadcaster.republish(self.about())
            else:
                self.broadcaster = Broadcaster(conn, self.topics, self.spec, self.policy, max_message_bytes=self.max_message_bytes)
                await self.commit_and_publish(self.broadcaster.begin(self.true, 0, devices_hold=True))
            yield self.broadcaster

    def about(self, *, final: bool = False) -> Any:
        assert self.broadcaster is not None
        return self.broadcaster.about(self.broadcaster.version + 1, None, self.task, final=final)

    async def commit_and_publish(self, step: Step) -> None:
        assert self.broadcaster is not None
        with self.db:  # the store's transaction (with the checkpoint, in the real thing)
            broadcast_store.save(self.db, self.broadcaster.state())
        await self.broadcaster.publish(step, self.about())

    def step(self) -> Step:
        assert self.broadcaster is not None
        self.true = {k: (v + self.rng.standard_normal(v.shape) * 0.02).astype(np.float32) for k, v in self.true.items()}
        return self.broadcaster.advance(self.true, self.broadcaster.version + 1)

    async def next_version(self) -> int:
        step = self.step()
        await self.commit_and_publish(step)
        return step.broadcast.version


class Fleet:
    """Agents as tasks: started, stopped (the device goes away, its state folder stays), restarted."""

    def __init__(self, address: BrokerAddress, fleet: str, root: Path, **overrides: Any) -> None:
        self.address, self.fleet, self.root, self.overrides = address, fleet, root, overrides
        self.agents: dict[int, Agent] = {}
        self.tasks: dict[int, asyncio.Task[None]] = {}

    def start(self, index: int, **overrides: Any) -> Agent:
        settings = {**self.overrides, **overrides}
        agent = Agent(agent_config(self.address, self.fleet, self.root, index, task_options=DIGITS_5, **settings))
        self.agents[index], self.tasks[index] = agent, asyncio.create_task(agent.run(), name=f"agent-{index}")
        return agent

    async def stop(self, index: int) -> None:
        self.agents[index].stop()
        await self.tasks.pop(index)

    async def finish(self) -> None:
        await asyncio.gather(*self.tasks.values())

    def running(self) -> list[Agent]:
        return [self.agents[i] for i in self.tasks]


async def trained_on(peer: RawPeer, agents: Iterable[Agent], version: int) -> dict[str, Update]:
    """Wait for an update of every agent trained on ``version`` (it holds it: that is what it trained from)."""
    waiting = {a.config.client_id for a in agents}
    found: dict[str, Update] = {}
    async for message in peer.client.messages:
        if "/updates/" in str(message.topic):
            update = Update.from_bytes(message.payload, max_bytes=1 << 24)  # type: ignore[arg-type]
            if update.client_id in waiting and update.base_version == version:
                found[update.client_id] = update
                waiting.discard(update.client_id)
                if not waiting:
                    return found
    raise AssertionError("connection closed")


async def retained(address: BrokerAddress, topics: Topics) -> dict[str, bytes]:
    """Every retained message under the fleet's global topics, by topic."""
    sentinel = f"{topics.prefix}/zz-sentinel"
    found: dict[str, bytes] = {}
    async with raw_peer(address, f"retained-{topics.fleet}", f"{topics.global_model}/#", topics.global_model, sentinel) as peer:
        await peer.client.publish(sentinel, b"end", qos=1)  # the retained messages came right after the SUBACKs, before this
        async for message in peer.client.messages:
            if str(message.topic) == sentinel:
                return found
            if message.retain and message.payload:
                found[str(message.topic)] = message.payload  # type: ignore[assignment]
    raise AssertionError("connection closed")


class CorruptOnce(Connection):
    """The broadcaster's connection, damaging the tensor data of the next announcement on ``global`` only
    (its retained copy on global/delta/<v> goes out intact): a broken publish the devices must survive."""

    armed = False

    async def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> None:
        if self.armed and topic.endswith("/global") and payload and not is_manifest(payload):
            self.armed = False
            obj = msgpack.unpackb(payload, raw=False)  # a GlobalDelta's compact form: tensors are [name, shape, data]
            tensor = obj[compact.DELTA_FIELDS.index("tensors")][0]
            data = bytearray(tensor[2])
            data[len(data) // 2 :] = bytes(len(data) - len(data) // 2)  # the second half zeroed: zstd's frame is broken
            tensor[2] = bytes(data)
            payload = msgpack.packb(obj, use_bin_type=True)
        await super().publish(topic, payload, retain=retain)


async def test_devices_follow_miss_join_survive_a_restart_and_a_corrupt_delta(broker_address, fleet, tmp_path):
    coordinator = Coordinator(broker_address, fleet, tmp_path, BroadcastPolicy(chain="flat+topk:0.05+q4+zstd", every=30, ratio=None))
    devices = Fleet(broker_address, fleet, tmp_path / "agents")
    topics = Topics(fleet)
    async with asyncio.timeout(120), raw_peer(broker_address, "updates", topics.all_updates) as peer:
        async with coordinator.connected(resume=False) as broadcaster:
            for index in range(2):
                devices.start(index)
            # a device whose broker session ends when it disconnects: offline, it misses announcements
            # (a persistent session would queue them for it, and it would follow without catching up)
            devices.start(2, session_expiry=0)
            await trained_on(peer, devices.running(), 0)  # v0 is a hold: each device built it and checked the hash
            check_held(devices.running(), broadcaster)
            assert all(a.stats.held.accepted == 1 and a.stats.held.caught_up == 0 for a in devices.running())
            for _ in range(2):
                await trained_on(peer, devices.running(), await coordinator.next_version())
            check_held(devices.running(), broadcaster)

            await devices.stop(2)  # a device goes offline at v2 ...
            for _ in range(2):
                await trained_on(peer, devices.running(), await coordinator.next_version())
            returning = devices.start(2, session_expiry=0)  # ... and comes back at v4 with its state folder: it needs delta 3 only
            joining = devices.start(3)  # a new device: its own build of v0, then deltas 1-3 (the keyframe is v0)
            await trained_on(peer, [returning, joining], 4)
            check_held(devices.running(), broadcaster)
            assert returning.stats.held.caught_up == 1 and returning.stats.held.refusals == ["base_mismatch"]
            assert joining.stats.held.caught_up == 1 and joining.stats.held.fell_back == 0
            assert 0 < returning.stats.held.bytes < joining.stats.held.bytes < 4 * 1200  # retained deltas, no keyframe

        # the aggregator restarts: the broadcaster resumes from what was committed, republishes, goes on
        async with coordinator.connected(resume=True) as broadcaster:
            await trained_on(peer, devices.running(), await coordinator.next_version())
            check_held(devices.running(), broadcaster)

            # a keyframe on demand retires the retained deltas from the broker
            broadcaster.request_keyframe()
            version = await coordinator.next_version()
            await trained_on(peer, devices.running(), version)
            on_broker = await retained(broker_address, topics)
            assert sorted(t for t in on_broker if "/delta/" in t) == []
            assert GlobalModel.from_bytes(on_broker[topics.global_keyframe], max_bytes=1 << 24).model_version == version

        # a damaged announcement: refused with its reason, each device falls back to the full model
        async with coordinator.connected(resume=True, link=CorruptOnce) as broadcaster:
            assert isinstance(coordinator.conn, CorruptOnce)
            coordinator.conn.armed = True
            version = await coordinator.next_version()
            assert not coordinator.conn.armed  # the announcement went out damaged, its retained copy intact
            await trained_on(peer, devices.running(), version)
            check_held(devices.running(), broadcaster)
            for agent in devices.running():
                assert agent.stats.held.fell_back == 1, agent.config.client_id
                assert agent.stats.held.refusals[-1] == "bad_tensor"
            await broadcaster.announce(coordinator.about(final=True))
        await devices.finish()


async def test_chunked_broadcasts_and_a_task_that_changes(broker_address, fleet, tmp_path):
    """Announcements, keyframes and retained deltas above max_message_bytes go in chunks; a device
    that missed the announcement carrying a new task fetches it from global/task."""
    policy = BroadcastPolicy(chain="flat+q8+zstd", every=30, ratio=None)  # ~3.6 KB deltas
    coordinator = Coordinator(broker_address, fleet, tmp_path, policy, max_message_bytes=2048)
    devices = Fleet(broker_address, fleet, tmp_path / "agents")
    topics = Topics(fleet)
    async with asyncio.timeout(120), raw_peer(broker_address, "updates", topics.all_updates) as peer:
        async with coordinator.connected(resume=False) as broadcaster:
            broadcaster.request_keyframe()  # a keyframe at v1, so a new device downloads a chunked one
            devices.start(0)
            devices.start(1)
            await trained_on(peer, devices.running(), 0)
            await trained_on(peer, devices.running(), await coordinator.next_version())
            await devices.stop(1)
            coordinator.task = TaskConfig(local_epochs=1, batch_size=16, lr=0.1, codec="flat+topk:0.02+q4+zstd", extra={"mode": "async"})
            for _ in range(2):
                await trained_on(peer, devices.running(), await coordinator.next_version())
            on_broker = await retained(broker_address, topics)
            assert is_manifest(on_broker[topics.global_model]) and is_manifest(on_broker[topics.global_keyframe])
            assert is_manifest(on_broker[topics.global_delta(3)])
            returning, joining = devices.start(1), devices.start(2)
            await trained_on(peer, [returning, joining], 3)
            check_held(devices.running(), broadcaster)
            for agent in (returning, joining):
                assert agent._following().task == coordinator.task  # fetched from global/task: v3 only names it
            assert returning.stats.held.bytes < joining.stats.held.bytes  # deltas 2 (and the task); keyframe v1 + delta 2
            assert joining.stats.held.bytes > 36_000
            await broadcaster.announce(coordinator.about(final=True))
        await devices.finish()


async def test_a_catch_up_that_cannot_complete_is_reported_then_healed(broker_address, fleet, tmp_path):
    """The retained topics are gone (a broker that lost them): a device that needs them says so in its
    presence after its timeout, trains on nothing, and recovers when the aggregator republishes."""
    coordinator = Coordinator(broker_address, fleet, tmp_path, BroadcastPolicy(every=30, ratio=None))
    devices = Fleet(broker_address, fleet, tmp_path / "agents", chunk_timeout=1.0)
    topics = Topics(fleet)
    async with asyncio.timeout(60), raw_peer(broker_address, "updates", topics.all_updates, topics.all_presence) as peer:
        async with coordinator.connected(resume=False) as broadcaster:
            for _ in range(2):
                await coordinator.next_version()
            async with raw_peer(broker_address, "eraser") as eraser:
                for topic in (topics.global_keyframe, topics.global_delta(1), topics.global_task):
                    await eraser.client.publish(topic, b"", qos=1, retain=True)
            joining = devices.start(0)
            async for message in peer.client.messages:
                if str(message.topic) == topics.presence("agent-0"):
                    presence = Presence.from_bytes(message.payload)  # type: ignore[arg-type]
                    if presence.why_not.startswith("incomplete"):
                        break
            assert joining.stats.held.failed == 1 and not joining.stats.trained_versions
            await broadcaster.republish(coordinator.about())
            await trained_on(peer, [joining], 2)
            check_held([joining], broadcaster)
            await broadcaster.announce(coordinator.about(final=True))
        await devices.finish()



async def test_a_crash_between_commit_and_publish_is_repaired_by_the_republish(broker_address, fleet, tmp_path):
    """Chunked everything; the aggregator dies after committing a keyframe version and before publishing
    it: the resumed broadcaster publishes it from the stored bytes and empties what it made obsolete."""
    policy = BroadcastPolicy(chain="flat+q8+zstd", every=3, ratio=None)
    coordinator = Coordinator(broker_address, fleet, tmp_path, policy, max_message_bytes=2048)
    topics = Topics(fleet)
    async with asyncio.timeout(60):
        async with coordinator.connected(resume=False) as broadcaster:
            for _ in range(2):
                await coordinator.next_version()
            before = await retained(broker_address, topics)
            assert {topics.global_delta(1), topics.global_delta(2), f"{topics.keyframe_chunks(0)}/0", f"{topics.global_chunks(2)}/0"} <= set(before)
            step = coordinator.step()  # v3: a snapshot keyframe that retires deltas 1 and 2
            assert step.keyframe is not None and step.retire == (1, 2)
            with coordinator.db:
                broadcast_store.save(coordinator.db, broadcaster.state())
        # ... and it dies here, before publishing v3
        async with coordinator.connected(resume=True) as broadcaster:
            after = await retained(broker_address, topics)
            assert not [t for t in after if "/delta/" in t or t.startswith((f"{topics.keyframe_chunks(0)}/", f"{topics.global_chunks(2)}/"))]
            assert GlobalModel.from_bytes(_whole(after, topics.global_keyframe, topics.keyframe_chunks(3)), max_bytes=1 << 24).model_version == 3
            announced = decode_announcement(_whole(after, topics.global_model, topics.global_chunks(3)), max_bytes=1 << 24)
            assert announced.model_version == 3 and announced.held_hash == broadcaster.held_hash
            devices = Fleet(broker_address, fleet, tmp_path / "agents")
            async with raw_peer(broker_address, "updates", topics.all_updates) as peer:
                joining = devices.start(0)
                await trained_on(peer, [joining], 3)
                check_held([joining], broadcaster)
                await broadcaster.announce(coordinator.about(final=True))
            await devices.finish()


def _whole(found: dict[str, bytes], topic: str, base: str) -> bytes:
    """A retained message as its receiver gets it: whole, or reassembled from its manifest's chunks."""
    manifest = Manifest.from_bytes(found[topic], max_size=1 << 24)
    return b"".join(found[f"{base}/{i}"] for i in range(manifest.count))


async def test_the_simulation_wire_tap_counts_delta_announcements_and_catch_up_material(broker_address, fleet, tmp_path):
    """bytes down per round: each announcement (manifest and chunks included) x subscribers; the catch-up
    material the broadcaster stores (keyframe, retained copies, task) once, as retained bytes."""
    coordinator = Coordinator(broker_address, fleet, tmp_path, BroadcastPolicy(chain="flat+q8+zstd", every=3, ratio=None),
                              max_message_bytes=4096)
    topics = Topics(fleet)
    tap = WireTap(broker_address, fleet, subscribers=3)
    async with asyncio.timeout(30), tap:
        async with coordinator.connected(resume=False) as broadcaster:
            for _ in range(4):  # v3 is a snapshot keyframe
                await coordinator.next_version()
            sent = broadcaster.sent
            await coordinator.conn.publish(topics.status, RoundStatus(fleet, 5, 4, RoundState.FINISHED, 0, 1, 1, None).to_bytes())  # type: ignore[union-attr]
            await tap.finished.wait()
    assert [s.version for s in sent] == [0, 1, 2, 3, 4] and sent[1].announcement > 4096  # chunked
    for s in sent:
        traffic = tap.rounds[s.version + 1]
        assert traffic.global_payloads == [s.announcement]
        assert tap.bytes_down(s.version + 1) == 3 * s.announcement
        assert traffic.retained_bytes == s.keyframe + s.retained + s.task, s
    assert sent[0].keyframe > 0 and sent[0].task > 0 and sent[3].keyframe > 0 and sent[3].retained == 0 and sent[4].retained > 0
    assert tap.unattributed_bytes == 0


async def test_an_agent_that_trains_in_a_child_process_trains_from_the_held_model(broker_address, fleet, tmp_path):
    """The training child gets the held weights as a full float32 GlobalModel (no pickle), and the
    device's version 0 comes from the child that describes the task."""
    coordinator = Coordinator(broker_address, fleet, tmp_path, BroadcastPolicy(every=30, ratio=None))
    devices = Fleet(broker_address, fleet, tmp_path / "agents", isolate_training=True)
    topics = Topics(fleet)
    async with asyncio.timeout(120), raw_peer(broker_address, "updates", topics.all_updates) as peer:
        async with coordinator.connected(resume=False) as broadcaster:
            agent = devices.start(0)
            first = (await trained_on(peer, [agent], 0))["agent-0"]
            assert agent.stats.held.accepted == 1 and agent.stats.held.caught_up == 0  # its own build matched the hold's hash
            update = (await trained_on(peer, [agent], await coordinator.next_version()))["agent-0"]
            check_held([agent], broadcaster)
            assert update.base_version == 1 and first.base_version == 0 and agent._trainer is None
            await broadcaster.announce(coordinator.about(final=True))
        await devices.finish()


async def test_a_delta_announcement_carries_the_cohort_a_device_is_not_invited_to(broker_address, fleet, tmp_path):
    """Participation under delta broadcasts: an uninvited device holds the version but does not train on it."""
    coordinator = Coordinator(broker_address, fleet, tmp_path, BroadcastPolicy(every=30, ratio=None))
    devices = Fleet(broker_address, fleet, tmp_path / "agents")
    topics = Topics(fleet)
    async with asyncio.timeout(60), raw_peer(broker_address, "updates", topics.all_updates) as peer:
        async with coordinator.connected(resume=False) as broadcaster:
            first, second = devices.start(0), devices.start(1)
            await trained_on(peer, [first, second], 0)
            step = coordinator.step()
            with coordinator.db:
                broadcast_store.save(coordinator.db, broadcaster.state())
            only_first = Participation(InviteSet.of(["agent-0"], fleet=fleet, round_no=2, bits=8))
            await broadcaster.publish(step, broadcaster.about(2, None, coordinator.task, cohort=only_first))
            await trained_on(peer, [first], 1)
            await trained_on(peer, [first, second], await coordinator.next_version())  # v2: no cohort, both train
            check_held([first, second], broadcaster)
            assert first.stats.trained_versions == [0, 1, 2] and second.stats.trained_versions == [0, 2]
            await broadcaster.announce(coordinator.about(final=True))
        await devices.finish()
