"""Large models: a global model and updates above ``max_message_bytes`` travel in chunks with a
manifest, over a real Mosquitto, and the training is the one an unchunked run produces."""

from __future__ import annotations

import asyncio
import contextlib

import numpy as np
import pytest

from aggregator import Aggregator
from aggregator.store import Store
from edge_agent import Agent
from fedge_contract import GlobalModel, Presence, Receipt, ReceiptStatus, TaskConfig, Topics, Update
from fedge_contract.chunks import Manifest, assemble, is_manifest, split
from fedge_contract.codecs import encode_weights, parse_chain
from fedge_contract.tensors import ModelSpec
from fedge_tasks import load_task
from fedge_tasks.weights import get_weights
from tests.integration.fleet import DIGITS_5, RawPeer, agent_config, aggregator_config, raw_peer, run_fleet

pytestmark = pytest.mark.integration

# digits (9,738 float32 parameters): the global model and an uncompressed update are ~39 KB,
# so 16 KiB messages make three chunks of each.
SMALL = 16 * 1024
UNCOMPRESSED = {"codec": "none"}


def _fleet(address, fleet, root, *, agents=3, chunked: bool, **overrides):
    chunking = {"max_message_bytes": SMALL} if chunked else {}
    # whole models every version: their chunks (delta broadcasts' chunked keyframes: test_broadcasts_wired.py)
    settings = {"rounds": 2, "target": agents, "min_updates": agents, "training": UNCOMPRESSED, "broadcast": {"deltas": False},
                **chunking, **overrides}
    aggregator = Aggregator(aggregator_config(address, fleet, root / "agg.sqlite", **settings))
    return aggregator, [Agent(agent_config(address, fleet, root / "agents", i, **chunking)) for i in range(agents)]


async def _retained(address, topics: Topics) -> dict[str, bytes]:
    """Every retained message under the fleet's prefix, by topic."""
    sentinel = f"{topics.prefix}/zz-sentinel"
    found: dict[str, bytes] = {}
    async with raw_peer(address, "retained-reader", f"{topics.prefix}/#") as peer:
        # the broker sends the retained messages right after the SUBACK, before anything published later
        await peer.client.publish(sentinel, b"end", qos=1)
        async for message in peer.client.messages:
            if str(message.topic) == sentinel:
                return found
            if message.retain:
                found[str(message.topic)] = message.payload  # type: ignore[assignment]
    raise AssertionError("connection closed")


async def test_chunked_models_and_updates_train_like_unchunked_ones(broker_address, fleet, tmp_path):
    reference, reference_agents = _fleet(broker_address, f"{fleet}-whole", tmp_path / "whole", chunked=False)
    async with asyncio.timeout(60):
        await run_fleet(reference, reference_agents)

    topics = Topics(fleet)
    aggregator, agents = _fleet(broker_address, fleet, tmp_path / "chunked", chunked=True)
    seen: list[tuple[str, bytes]] = []
    async with asyncio.timeout(60), raw_peer(broker_address, "tap", topics.global_model, topics.all_updates) as tap:
        async def record() -> None:
            async for message in tap.client.messages:
                seen.append((str(message.topic), message.payload))  # type: ignore[arg-type]

        recording = asyncio.create_task(record())
        try:
            await run_fleet(aggregator, agents)
        finally:
            recording.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await recording

    # everything big went as a manifest: 3 global versions (v0, v1 and the final v2), 6 updates
    manifests = [(topic, Manifest.from_bytes(payload, max_size=10**8)) for topic, payload in seen if is_manifest(payload)]
    assert {m.model_version for t, m in manifests if t == topics.global_model} == {0, 1, 2}
    assert sum(1 for t, m in manifests if m.kind == "update") == 6
    assert all(m.count == 3 for _, m in manifests)
    assert not [t for t, p in seen if not is_manifest(p) and p]  # no whole model or update crossed the broker

    for agent in agents:
        assert agent.stats.trained_versions == [0, 1]
        assert [r.status for r in agent.stats.receipts] == [ReceiptStatus.ACCEPTED] * 2
    with Store(tmp_path / "whole" / "agg.sqlite") as whole, Store(tmp_path / "chunked" / "agg.sqlite") as chunked:
        expected, got = whole.latest_checkpoint(), chunked.latest_checkpoint()
    assert got.version == expected.version == 2
    for name, values in expected.weights.items():
        np.testing.assert_allclose(got.weights[name], values, rtol=1e-6, atol=1e-7)

    # what stays retained: the final model's manifest and its chunks; no update chunks, no older version
    retained = await _retained(broker_address, topics)
    chunk_topics = {t for t in retained if topics.chunk_of(t)}
    assert chunk_topics == {f"{topics.global_chunks(2)}/{i}" for i in range(3)}
    final = Manifest.from_bytes(retained[topics.global_model], max_size=10**8)
    pieces = [retained[f"{topics.global_chunks(2)}/{i}"] for i in range(3)]
    model = GlobalModel.from_bytes(b"".join(pieces), max_bytes=10**8)
    assert final.model_version == model.model_version == 2 and model.final


def _mallory_update(aggregator: Aggregator, update_id: str, *, value: float = 0.0) -> bytes:
    delta = {t.name: np.full(t.shape, value, np.float32) for t in aggregator.model.spec.tensors}
    return Update(aggregator.config.fleet, "mallory", update_id, 1, 0, 10, encode_weights(delta, parse_chain("none"))).to_bytes()


async def test_bad_chunked_updates_get_receipts_and_the_model_is_intact(broker_address, fleet, tmp_path):
    reference, reference_agents = _fleet(broker_address, f"{fleet}-clean", tmp_path / "clean", agents=2, chunked=False, rounds=1)
    async with asyncio.timeout(60):
        await run_fleet(reference, reference_agents)

    topics = Topics(fleet)
    # every device trains (no cohort): mallory's updates must reach validation, not be refused as not invited
    aggregator, agents = _fleet(broker_address, fleet, tmp_path / "attacked", agents=2, chunked=True, rounds=1, chunk_timeout=1.0,
                                over_select=0)
    async with asyncio.timeout(60), raw_peer(broker_address, "mallory", topics.global_model, topics.receipt("mallory")) as mallory:
        serving = asyncio.create_task(aggregator.run())
        assert is_manifest(await mallory.next_payload(topics.global_model))  # round 1 is open, the model went in chunks

        def chunked(update_id: str, payload: bytes, **identity) -> tuple[Manifest, list[bytes]]:
            who = {"client_id": "mallory", "update_id": update_id, **identity}
            return Manifest.of(payload, fleet=fleet, kind="update", chunk_size=SMALL, **who), split(payload, SMALL)

        corrupt, corrupt_pieces = chunked("corrupt", _mallory_update(aggregator, "corrupt"))
        corrupt_pieces[1] = bytes([corrupt_pieces[1][0] ^ 1]) + corrupt_pieces[1][1:]
        missing, pieces = chunked("missing", _mallory_update(aggregator, "missing"))
        missing_pieces = {0: pieces[0], 2: pieces[2]}  # chunk 1 never comes
        lying, lying_pieces = chunked("lying", _mallory_update(aggregator, "lying"))
        lying = Manifest(**{**lying.__dict__, "digest": bytes(32)})  # every chunk matches, the whole does not
        nan, nan_pieces = chunked("nan", _mallory_update(aggregator, "nan", value=float("nan")))  # reassembles, then fails decoding
        impostor, _ = chunked("impostor", _mallory_update(aggregator, "impostor"), client_id="agent-0")
        huge = Manifest(**{**corrupt.__dict__, "update_id": "huge", "size": 10**9, "chunk_size": 10**9 // 2,
                           "chunks": corrupt.chunks[:2]})
        sets = ((corrupt, dict(enumerate(corrupt_pieces))), (missing, missing_pieces), (lying, dict(enumerate(lying_pieces))),
                (nan, dict(enumerate(nan_pieces))))
        for manifest, published in sets:
            base = topics.update_chunks("mallory", manifest.update_id)
            for index, piece in published.items():
                await mallory.client.publish(f"{base}/{index}", piece, qos=1, retain=True)
        for manifest in (corrupt, missing, lying, nan, impostor, huge):
            await mallory.client.publish(topics.update("mallory"), manifest.to_bytes(), qos=1)

        receipts = await mallory.receipts(6)
        reasons = {uid: (r.status, r.reason.split(":", 1)[0]) for uid, r in receipts.items()}
        rejected = ReceiptStatus.REJECTED
        assert reasons == {
            "corrupt": (rejected, "bad_chunk"), "missing": (rejected, "incomplete"), "lying": (rejected, "bad_chunk"),
            "nan": (rejected, "non_finite"), "impostor": (rejected, "client_mismatch"), "huge": (rejected, "too_large"),
        }
        assert "chunks (1) still missing" in receipts["missing"].reason

        async with asyncio.TaskGroup() as group:
            for agent in agents:
                group.create_task(agent.run())
            await serving

    with Store(tmp_path / "clean" / "agg.sqlite") as clean, Store(tmp_path / "attacked" / "agg.sqlite") as attacked:
        expected, got = clean.latest_checkpoint(), attacked.latest_checkpoint()
        assert {r["client_id"] for r in attacked.receipts() if r["status"] == "accepted"} == {"agent-0", "agent-1"}
    assert got.version == expected.version == 1
    for name, values in expected.weights.items():
        np.testing.assert_allclose(got.weights[name], values, rtol=1e-6, atol=1e-7)
    retained = await _retained(broker_address, topics)
    assert not [t for t in retained if "/updates/" in t]  # the aggregator emptied every update's chunk topics


async def _update_from_chunks(peer: RawPeer, topics: Topics, manifest: Manifest) -> Update:
    """Fetch an update's retained chunks as the aggregator would, and decode it."""
    assert manifest.client_id is not None and manifest.update_id is not None
    base = topics.update_chunks(manifest.client_id, manifest.update_id)
    await peer.client.subscribe(f"{base}/+", qos=1)
    pieces: dict[int, bytes] = {}
    async for message in peer.client.messages:
        ref = topics.chunk_of(str(message.topic))
        if ref is not None and ref.base == base:
            pieces[ref.index] = message.payload  # type: ignore[assignment]
            if len(pieces) == manifest.count:
                break
    await peer.client.unsubscribe(f"{base}/+")
    return Update.from_bytes(assemble(manifest, pieces), max_bytes=10**8)


async def test_an_agent_uses_a_chunked_global_model_only_when_complete_and_verified(broker_address, fleet, tmp_path):
    topics = Topics(fleet)
    weights = get_weights(load_task("digits", DIGITS_5).build_model())
    model = GlobalModel(fleet, 0, 1, None, TaskConfig(codec="none"), ModelSpec.of(weights).fingerprint, encode_weights(weights, parse_chain("none")))
    payload = model.to_bytes()
    manifest = Manifest.of(payload, fleet=fleet, kind="global", chunk_size=SMALL, model_version=0)
    pieces, base = split(payload, SMALL), topics.global_chunks(0)
    agent = Agent(agent_config(broker_address, fleet, tmp_path, 0, max_message_bytes=SMALL, chunk_timeout=0.5))
    async with asyncio.timeout(60), raw_peer(broker_address, "aggregator", topics.presence("agent-0"), topics.update("agent-0")) as peer:
        # the "aggregator" announces v0 but chunk 1 is corrupt and chunk 2 never comes
        await peer.client.publish(f"{base}/0", pieces[0], qos=1, retain=True)
        await peer.client.publish(f"{base}/1", b"\0" + pieces[1][1:], qos=1, retain=True)
        await peer.client.publish(topics.global_model, manifest.to_bytes(), qos=1, retain=True)
        running = asyncio.create_task(agent.run())
        presence = Presence.from_bytes(await peer.next_payload(topics.presence("agent-0")))
        while not presence.why_not:
            presence = Presence.from_bytes(await peer.next_payload(topics.presence("agent-0")))
        assert presence.why_not.startswith("incomplete: global model v0") and "chunk 1" in presence.why_not
        assert agent.stats.trained_versions == []  # nothing partial was used

        # the right chunks, announced again: the agent trains, and its 39 KB update goes in chunks too
        await peer.client.publish(f"{base}/1", pieces[1], qos=1, retain=True)
        await peer.client.publish(f"{base}/2", pieces[2], qos=1, retain=True)
        await peer.client.publish(topics.global_model, manifest.to_bytes(), qos=1, retain=True)
        sent = Manifest.from_bytes(await peer.next_payload(topics.update("agent-0")), max_size=10**8, fleet=fleet)
        assert (sent.kind, sent.client_id, sent.count) == ("update", "agent-0", 3)
        update = await _update_from_chunks(peer, topics, sent)
        assert (update.update_id, update.base_version, update.round) == (sent.update_id, 0, 1)
        assert agent.stats.trained_versions == [0]

        # announced once more without a receipt: the outbox resends the same update, chunks and manifest
        await peer.client.publish(topics.global_model, manifest.to_bytes(), qos=1, retain=True)
        assert Manifest.from_bytes(await peer.next_payload(topics.update("agent-0")), max_size=10**8) == sent
        # "incomplete" (the aggregator missed chunks, e.g. a broker that lost them): sent again, not dropped
        incomplete = Receipt(fleet, "agent-0", sent.update_id, ReceiptStatus.REJECTED, "incomplete: chunk 2 missing", 1, 0)
        await peer.client.publish(topics.receipt("agent-0"), incomplete.to_bytes(), qos=1)
        assert Manifest.from_bytes(await peer.next_payload(topics.update("agent-0")), max_size=10**8) == sent
        # its receipt: the agent empties the chunk topics it had retained
        base_of_update = topics.update_chunks("agent-0", sent.update_id)
        await peer.client.subscribe(f"{base_of_update}/+", qos=1)  # before the receipt: the clears come after
        receipt = Receipt(fleet, "agent-0", sent.update_id, ReceiptStatus.ACCEPTED, "", 1, 0)
        await peer.client.publish(topics.receipt("agent-0"), receipt.to_bytes(), qos=1)
        cleared = set()
        async for message in peer.client.messages:  # the clears reach a subscriber as empty messages
            ref = topics.chunk_of(str(message.topic))
            if ref is not None and ref.base == base_of_update and not message.payload:
                cleared.add(ref.index)
                if cleared == {0, 1, 2}:
                    break
        agent.stop()
        await running
    assert not [t for t in await _retained(broker_address, topics) if "/updates/" in t]
    assert not list((tmp_path / "agent-0" / "outbox").glob("*.update"))


async def test_sharded_workers_fetch_the_chunks_of_the_manifests_they_get(broker_address, fleet, tmp_path):
    """With --workers, the broker deals manifests round-robin; each worker fetches its updates' chunks."""
    from aggregator import Aggregator

    reference, reference_agents = _fleet(broker_address, f"{fleet}-one", tmp_path / "one", agents=4, chunked=False, rounds=1)
    async with asyncio.timeout(60):
        await run_fleet(reference, reference_agents)
    chunking = {"max_message_bytes": SMALL}
    config = aggregator_config(broker_address, fleet, tmp_path / "sharded.sqlite", rounds=1, target=4, min_updates=4, training=UNCOMPRESSED,
                               workers=2, **chunking)
    agents = [Agent(agent_config(broker_address, fleet, tmp_path / "agents", i, **chunking)) for i in range(4)]
    async with asyncio.timeout(60):
        await run_fleet(Aggregator(config), agents)
    assert all([r.status for r in a.stats.receipts] == [ReceiptStatus.ACCEPTED] for a in agents)
    with Store(tmp_path / "one" / "agg.sqlite") as one, Store(tmp_path / "sharded.sqlite") as sharded:
        expected, got = one.latest_checkpoint(), sharded.latest_checkpoint()
        by_shard = sharded.accepted_by_shard(1)
    assert set(by_shard) == {0, 1}, by_shard  # both workers reassembled updates
    for name, values in expected.weights.items():
        np.testing.assert_allclose(got.weights[name], values, rtol=1e-6, atol=1e-7)
    assert not [t for t in await _retained(broker_address, Topics(fleet)) if "/updates/" in t]
