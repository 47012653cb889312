"""Delta broadcasts in the round loop (issue 16): a real aggregator, real agents, a real Mosquitto.

Every test ends with the agents holding, bit for bit, the model the aggregator's broadcaster holds
(the hash every broadcast carries, and the weights themselves): the model the fleet runs.
"""

from __future__ import annotations

import asyncio
import sqlite3
from typing import Any

import msgpack
import pytest

from aggregator import Aggregator
from aggregator.broadcasting.broadcaster import Broadcaster
from aggregator.broadcasting.deltas import DeltaBroadcasts
from aggregator.store import Store
from edge_agent import Agent
from fedge_contract import GlobalModel, Presence, RoundState, Topics, compact
from fedge_contract.aio import cancel_and_wait
from fedge_contract.broadcast import GlobalDelta, decode_announcement
from fedge_contract.chunks import Manifest, is_manifest
from tests.integration.faults import Observer
from tests.integration.fleet import ManualGate, agent_config, aggregator_config, check_held, raw_peer, run_fleet

pytestmark = pytest.mark.integration


def caster(aggregator: Aggregator) -> Broadcaster:
    channel = aggregator.channel
    assert isinstance(channel, DeltaBroadcasts)
    return channel.broadcaster


def announced_bytes(aggregator: Aggregator, kind: str = "announcement") -> float:
    value = aggregator.metrics.registry.get_sample_value("fedge_broadcast_bytes_total", {"kind": kind})
    assert value is not None
    return value


async def test_a_run_ends_on_the_model_every_agent_holds(broker_address, fleet, tmp_path):
    config = aggregator_config(broker_address, fleet, tmp_path / "agg.sqlite", rounds=3, target=3, min_updates=3)
    aggregator = Aggregator(config)
    agents = [Agent(agent_config(broker_address, fleet, tmp_path, i)) for i in range(3)]
    async with asyncio.timeout(90), Observer(broker_address, fleet) as observer:
        await run_fleet(aggregator, agents)
        await observer.until(lambda o: any(s.state is RoundState.FINISHED for s in o.statuses))
    broadcaster = caster(aggregator)
    assert broadcaster.version == 3
    check_held(agents, broadcaster)
    for agent in agents:
        assert agent.stats.trained_versions == [0, 1, 2]
        held = agent.stats.held
        assert (held.caught_up, held.fell_back, held.failed, held.refusals, held.bytes) == (0, 0, 0, [], 0)  # followed every delta
    final = observer.globals[-1]
    assert isinstance(final, GlobalDelta) and final.final and final.held_hash == broadcaster.held_hash

    # bytes down next to bytes up: the store, each status, Prometheus and the agents agree
    with Store(tmp_path / "agg.sqlite", readonly=True) as store:
        rounds = store.rounds()
        state = store.broadcast_state(3)
    down = [r["bytes_down"] for r in rounds]
    assert 250 < down[0] < 450 and all(300 < d < 1_500 for d in down[1:])  # a hold for v0, then deltas; the model is 38,889
    opened = {s.round: s for s in observer.statuses if s.state is RoundState.OPEN}
    assert [opened[r["round"]].bytes_down for r in rounds] == down
    aggregating = [s for s in observer.statuses if s.state is RoundState.AGGREGATING]
    assert aggregating and all(s.bytes_up and s.bytes_up > 3 * 200 for s in aggregating)
    every = announced_bytes(aggregator)  # the final announcement too
    assert all(agent.stats.bytes_down == every for agent in agents)  # each device downloaded each announcement once
    assert 300 < every - sum(down) < 1_500  # the final announcement: v3, a delta too
    assert announced_bytes(aggregator, "keyframe") > 30_000  # v0's snapshot, for devices whose own build differs
    for row in rounds:  # accuracy is the held model's (what devices run), the true model's beside it
        assert 0 < row["metrics"]["accuracy"] <= 1 and 0 < row["metrics"]["true_accuracy"] <= 1
    assert state is not None  # committed with the checkpoint: what a restart resumes
    resumed = Broadcaster.from_state(None, Topics(fleet), broadcaster.spec, broadcaster.policy, state)
    assert resumed.held_hash == broadcaster.held_hash


async def test_async_mode(broker_address, fleet, tmp_path):
    config = aggregator_config(broker_address, fleet, tmp_path / "agg.sqlite", mode="async", buffer_size=3, max_staleness=2, rounds=4)
    aggregator = Aggregator(config)
    agents = [Agent(agent_config(broker_address, fleet, tmp_path, i)) for i in range(4)]
    async with asyncio.timeout(90):
        await run_fleet(aggregator, agents)
    check_held(agents, caster(aggregator))
    with Store(tmp_path / "agg.sqlite", readonly=True) as store:
        rounds, receipts = store.rounds(), store.receipts()
    assert [r["accepted"] for r in rounds] == [3, 3, 3, 3] and {r["status"] for r in receipts} <= {"accepted", "stale", "duplicate"}
    assert all(a.stats.held.failed == 0 and a.stats.held.fell_back == 0 for a in agents)
    assert rounds[-1]["metrics"]["accuracy"] > 0.3


async def test_chunked_deltas_and_keyframes_and_a_device_that_joins_late(broker_address, fleet, tmp_path):
    """Deltas (~39 KB in float32) and keyframes (~35 KB) above 2 KiB go in chunks; a device that joins at v5
    fetches the chunked keyframe v3 and the chunked retained delta v4, then applies the announcement."""
    chunking = {"max_message_bytes": 2048}
    config = aggregator_config(broker_address, fleet, tmp_path / "agg.sqlite", rounds=6, target=2, min_updates=2,
                               broadcast={"chain": "none", "every": 3, "ratio": "none"}, **chunking)
    aggregator = Aggregator(config)
    agents = [Agent(agent_config(broker_address, fleet, tmp_path, i, **chunking)) for i in range(2)]
    topics = Topics(fleet)
    async with asyncio.timeout(120), raw_peer(broker_address, "watcher", topics.global_model) as watcher:
        async with asyncio.TaskGroup() as group:
            for agent in agents:
                group.create_task(agent.run())
            serving = group.create_task(aggregator.run())
            seen: list[tuple[int, bool]] = []
            while not seen or seen[-1][0] < 5:
                payload = await watcher.next_payload(topics.global_model)
                chunked = is_manifest(payload)
                message = Manifest.from_bytes(payload, max_size=10**8) if chunked else decode_announcement(payload, max_bytes=10**8)
                assert message.model_version is not None
                seen.append((message.model_version, chunked))
            assert seen[0] == (0, False) and all(chunked for _, chunked in seen[1:]), seen  # a hold, then every delta in chunks
            joining = Agent(agent_config(broker_address, fleet, tmp_path, 2, **chunking))
            group.create_task(joining.run())
            await serving
    check_held([*agents, joining], caster(aggregator))
    held = joining.stats.held
    assert held.caught_up >= 1 and held.fell_back == 0 and set(held.refusals) == {"base_mismatch"}
    assert held.bytes > 35_000  # the keyframe, in chunks
    assert all(a.stats.held.caught_up == 0 and a.stats.held.bytes == 0 for a in agents)  # followers never download a keyframe
    assert announced_bytes(aggregator, "keyframe") > 2 * 35_000 and announced_bytes(aggregator, "retained") > 0


async def test_a_restarted_aggregator_resumes_its_broadcasts_and_one_without_state_re_keys(broker_address, fleet, tmp_path):
    """Killed twice mid-run: the first restart resumes the committed broadcast state (devices go on with their
    deltas, nothing downloaded again); the second finds no state (a store from before delta broadcasts) and
    begins afresh with a full keyframe, which every device downloads once."""
    path = tmp_path / "agg.sqlite"
    config = aggregator_config(broker_address, fleet, path, rounds=6, target=2, min_updates=2, resend_grace=1.0)
    agents = [Agent(agent_config(broker_address, fleet, tmp_path, i)) for i in range(2)]
    async with asyncio.timeout(120), Observer(broker_address, fleet) as observer:
        running = [asyncio.create_task(agent.run()) for agent in agents]
        try:
            first = Aggregator(config)
            serving = asyncio.create_task(first.run())
            await observer.until(lambda o: o.round_open(3))
            await cancel_and_wait([serving])

            second = Aggregator(config)
            serving = asyncio.create_task(second.run())
            await observer.until(lambda o: o.round_open(5))
            await cancel_and_wait([serving])
            for agent in agents:  # followed the resumed broadcasts: never a catch-up, nothing fetched but announcements
                held = agent.stats.held
                assert (held.caught_up, held.fell_back, held.failed, held.bytes) == (0, 0, 0, 0), agent.config.client_id
            before = [agent.stats.bytes_down for agent in agents]
            with Store(path, readonly=True) as store:
                checkpoint = store.latest_checkpoint()
            assert checkpoint is not None and checkpoint.version >= 4
            resumed_at = checkpoint.version

            db = sqlite3.connect(path)
            with db:
                db.execute("DELETE FROM broadcast_header")  # no state for the checkpoint: as a store from before issue 16
            db.close()
            third = Aggregator(config)
            await third.run()
            await asyncio.gather(*running)
        finally:
            await cancel_and_wait(running)
    broadcaster = caster(third)
    check_held(agents, broadcaster)
    assert broadcaster.encoder.keyframe.version == resumed_at  # began afresh at the checkpoint it resumed
    for agent, had in zip(agents, before, strict=True):
        assert agent.stats.bytes_down - had > 35_000  # the full keyframe, once
        assert agent.stats.held.failed == 0 and agent.stats.held.fell_back == 0
    rekey = [g for g in observer.globals if isinstance(g, GlobalModel)]
    assert [(g.model_version, g.held_hash is not None) for g in rekey] == [(resumed_at, True)]


def corrupting(damage: dict[int, str]) -> tuple[list[int], Any]:
    """A Broadcaster._announce that damages the announcement (not its retained copy) of chosen versions, once each:
    ``data`` zeroes half of the tensor data (a malformed delta), ``hash`` names another model (a mismatched one)."""
    original = Broadcaster._announce
    done: list[int] = []

    async def announce(self: Broadcaster, payload: bytes | bytearray, version: int) -> int:
        how = damage.get(version)
        if how is not None and version not in done and not is_manifest(payload):
            done.append(version)
            obj: list[Any] = msgpack.unpackb(bytes(payload), raw=False)  # the compact form: tensors are [name, shape, data]
            if how == "data":
                tensor = obj[compact.DELTA_FIELDS.index("tensors")][0]
                data = bytearray(tensor[2])
                data[len(data) // 2 :] = bytes(len(data) - len(data) // 2)
                tensor[2] = bytes(data)
            else:
                obj[compact.DELTA_FIELDS.index("held_hash")] = bytes(16)
            payload = msgpack.packb(obj, use_bin_type=True)
        return await original(self, payload, version)

    return done, announce


async def test_a_malformed_or_mismatched_delta_is_refused_and_devices_fall_back_to_the_full_model(broker_address, fleet, tmp_path,
                                                                                                    monkeypatch):
    damaged, announce = corrupting({2: "data", 3: "hash"})
    monkeypatch.setattr(Broadcaster, "_announce", announce)
    config = aggregator_config(broker_address, fleet, tmp_path / "agg.sqlite", rounds=4, target=2, min_updates=2)
    aggregator = Aggregator(config)
    agents = [Agent(agent_config(broker_address, fleet, tmp_path, i)) for i in range(2)]
    async with asyncio.timeout(90):
        await run_fleet(aggregator, agents)
    assert damaged == [2, 3]
    check_held(agents, caster(aggregator))
    for agent in agents:
        held = agent.stats.held
        assert held.refusals == ["bad_tensor", "hash_mismatch"], agent.config.client_id  # each refused with its reason
        assert held.fell_back == 2 and held.caught_up == 2 and held.failed == 0
        assert agent.stats.trained_versions == [0, 1, 2, 3]  # and trained on each version all the same


async def test_devices_that_cannot_catch_up_get_a_keyframe(broker_address, fleet, tmp_path):
    """The broker loses the catch-up material behind the aggregator's back: two new devices fail to catch up
    and say so in their presence; the aggregator takes a keyframe at the next version and puts everything
    back, and they catch up from it."""
    topics = Topics(fleet)
    config = aggregator_config(broker_address, fleet, tmp_path / "agg.sqlite", rounds=4, target=2, min_updates=2, deadline=120.0)
    aggregator = Aggregator(config)
    gates = [ManualGate(passes=2) for _ in range(2)]  # rounds 1 and 2, then round 3 waits for the test
    agents = [Agent(agent_config(broker_address, fleet, tmp_path, i), gate=gate) for i, gate in enumerate(gates)]
    async with asyncio.timeout(120), raw_peer(broker_address, "presence", topics.all_presence) as peer:
        async with asyncio.TaskGroup() as group:
            serving = group.create_task(aggregator.run())
            for agent in agents:
                group.create_task(agent.run())
            async with Observer(broker_address, fleet) as observer:
                await observer.until(lambda o: o.round_open(3))
            async with raw_peer(broker_address, "eraser") as eraser:
                for topic in (topics.global_keyframe, topics.global_delta(1), topics.global_delta(2), topics.global_task):
                    await eraser.client.publish(topic, b"", qos=1, retain=True)
            joining = [Agent(agent_config(broker_address, fleet, tmp_path, i, chunk_timeout=1.0)) for i in (2, 3)]
            for agent in joining:
                group.create_task(agent.run())
            failing: set[str] = set()
            async for message in peer.client.messages:
                presence = Presence.from_bytes(message.payload)  # type: ignore[arg-type]
                if presence.why_not.startswith("incomplete"):
                    failing.add(presence.client_id)
                    if failing == {"agent-2", "agent-3"}:
                        break
            for gate in gates:
                gate.open()
            await serving
    broadcaster = caster(aggregator)
    check_held([*agents, *joining], broadcaster)
    assert aggregator.metrics.registry.get_sample_value("fedge_broadcast_keyframe_requests_total") == 1
    assert broadcaster.encoder.keyframe.version == 3  # the version after the failures
    for agent in joining:
        assert agent.stats.held.failed >= 1 and agent.stats.held.caught_up == 1


async def test_the_whole_model_path_still_works(broker_address, fleet, tmp_path):
    """--no-delta-broadcasts --global-codec f16+zstd: a GlobalModel every version, as agents before issue 16 expect."""
    config = aggregator_config(broker_address, fleet, tmp_path / "agg.sqlite", rounds=2, target=2, min_updates=2,
                               broadcast={"deltas": False}, global_codec="f16+zstd")
    aggregator = Aggregator(config)
    agents = [Agent(agent_config(broker_address, fleet, tmp_path, i)) for i in range(2)]
    async with asyncio.timeout(90), Observer(broker_address, fleet) as observer:
        await run_fleet(aggregator, agents)
        await observer.until(lambda o: any(s.state is RoundState.FINISHED for s in o.statuses))
    assert all(isinstance(g, GlobalModel) and g.held_hash is None for g in observer.globals)
    assert {t.codec for g in observer.globals for t in g.tensors} == {"f16+zstd"}
    assert all(a.stats.trained_versions == [0, 1] and a.stats.held.accepted == 0 for a in agents)  # never followed deltas
    with Store(tmp_path / "agg.sqlite", readonly=True) as store:
        rounds = store.rounds()
        assert store.broadcast_state(2) is None
    assert all(15_000 < r["bytes_down"] < 25_000 for r in rounds)  # the whole model in f16, every round
    assert 15_000 < announced_bytes(aggregator) - sum(r["bytes_down"] for r in rounds) < 25_000  # and the final one
    assert "true_accuracy" not in rounds[-1]["metrics"]
