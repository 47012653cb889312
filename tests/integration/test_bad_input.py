"""A hostile peer publishes broken updates while rounds run: each gets a receipt with a reason,
and the model that comes out is the one a clean run produces."""

from __future__ import annotations

import asyncio
import math

import msgpack
import numpy as np
import pytest

from aggregator import Aggregator
from aggregator.store import Store
from edge_agent import Agent
from fedge_contract import GlobalModel, ReceiptStatus, Topics, Update
from fedge_contract.codecs import encode_weights, parse_chain
from tests.integration.fleet import ManualGate, agent_config, aggregator_config, raw_peer, run_fleet

pytestmark = pytest.mark.integration


def _update(model: GlobalModel, update_id: str, *, client: str = "mallory", values: float = 0.0, **fields) -> dict:
    """A well-formed update as a plain dict, for the test to break one rule at a time."""
    shapes = {t.name: t.shape for t in model.tensors}
    delta = {name: np.full(shape, values, dtype=np.float32) for name, shape in shapes.items()}
    update = Update(model.fleet, client, update_id, model.round, model.model_version, 10, encode_weights(delta, parse_chain("none")))
    raw = msgpack.unpackb(update.to_bytes(), raw=False)
    raw.update(fields)
    return raw


def _hostile_payloads(model: GlobalModel, max_update_bytes: int) -> dict[str, tuple[bytes, str | None, ReceiptStatus, str]]:
    """case -> (payload, the update id its receipt names, expected status, expected reason code)."""
    rejected = ReceiptStatus.REJECTED
    wrong_len = _update(model, "wrong-length")
    wrong_len["tensors"][0]["data"] = wrong_len["tensors"][0]["data"][:-4]
    wrong_shape = _update(model, "wrong-shape")
    wrong_shape["tensors"][0]["shape"] = [wrong_shape["tensors"][0]["shape"][0] + 1, *wrong_shape["tensors"][0]["shape"][1:]]
    oversized = _update(model, "oversized", padding=b"\0" * max_update_bytes)
    # case -> (payload, the update id its receipt names (None: unreadable), status, reason code)
    return {
        "random-bytes": (np.random.default_rng(0).bytes(300), None, rejected, "malformed"),
        "no-header": (msgpack.packb({"update_id": "no-header", "hello": 1}), "no-header", rejected, "missing_field"),
        "future-schema": (msgpack.packb(_update(model, "future-schema", schema=99)), "future-schema", rejected, "schema"),
        "wrong-length": (msgpack.packb(wrong_len), "wrong-length", rejected, "bad_tensor"),
        "wrong-shape": (msgpack.packb(wrong_shape), "wrong-shape", rejected, "shape_mismatch"),
        "nan-values": (msgpack.packb(_update(model, "nan-values", values=math.nan)), "nan-values", rejected, "non_finite"),
        "inf-values": (msgpack.packb(_update(model, "inf-values", values=math.inf)), "inf-values", rejected, "non_finite"),
        "future-version": (msgpack.packb(_update(model, "future-version", base_version=7, round=8)), "future-version", rejected, "bad_value"),
        "speaks-for-agent-0": (msgpack.packb(_update(model, "speaks-for-agent-0", client="agent-0")), "speaks-for-agent-0", rejected,
                               "client_mismatch"),
        "oversized": (msgpack.packb(oversized), None, rejected, "too_large"),  # too large to be unpacked at all
        "no-samples": (msgpack.packb(_update(model, "no-samples", num_samples=0)), "no-samples", rejected, "bad_value"),
        "other-fleet": (msgpack.packb(_update(model, "other-fleet", fleet="elsewhere")), "other-fleet", rejected, "wrong_fleet"),
        "string-round": (msgpack.packb(_update(model, "string-round", round="1")), "string-round", rejected, "wrong_type"),
    }


async def test_hostile_updates_are_refused_and_the_model_is_untouched(broker_address, fleet, tmp_path):
    # the reference: the same fleet, no attacker
    clean = Aggregator(aggregator_config(broker_address, f"{fleet}-clean", tmp_path / "clean.sqlite", rounds=2, target=3, min_updates=3))
    async with asyncio.timeout(60):
        await run_fleet(clean, [Agent(agent_config(broker_address, f"{fleet}-clean", tmp_path / "clean", i)) for i in range(3)])

    topics = Topics(fleet)
    # every device trains (no cohort): mallory's payloads must reach validation, not be refused as not invited
    config = aggregator_config(broker_address, fleet, tmp_path / "attacked.sqlite", rounds=2, target=3, min_updates=3, over_select=0)
    attacked = Aggregator(config)
    gate = ManualGate(passes=1)  # agent-2 trains round 1, then waits for the test
    agents = [Agent(agent_config(broker_address, fleet, tmp_path / "attacked", i), gate=gate if i == 2 else None) for i in range(3)]
    subscriptions = (topics.global_model, topics.receipt("mallory"), topics.receipt("agent-0"), topics.update("agent-0"))
    async with asyncio.timeout(90), raw_peer(broker_address, "mallory", *subscriptions) as mallory:
        serving = asyncio.create_task(attacked.run())
        v0 = await mallory.first_model(topics)

        # round 1 is open and no agent runs yet: every hostile payload gets its receipt
        cases = _hostile_payloads(v0, attacked.limits.max_bytes)
        for payload, _, _, _ in cases.values():
            await mallory.client.publish(topics.update("mallory"), payload, qos=1)
        receipts = await mallory.receipt_list(len(cases))
        answered = sorted((r.update_id or "", r.status.value, r.reason.split(":", 1)[0], r.round) for r in receipts)
        expected = sorted((uid or "", status.value, reason, 1) for _, uid, status, reason in cases.values())
        assert answered == expected

        # the agents train round 1; agent-2 is then held back so round 2 stays open
        async with asyncio.TaskGroup() as group:
            for agent in agents:
                group.create_task(agent.run())
            replayed = await mallory.next_payload(topics.update("agent-0"))
            v1 = await mallory.announcement(topics)
            assert v1.model_version == 1
            # round 2: a replay of agent-0's accepted round-1 update, and an update for the old version
            await mallory.client.publish(topics.update("agent-0"), replayed, qos=1)
            stale = msgpack.packb(_update(v0, "old-version"))
            await mallory.client.publish(topics.update("mallory"), stale, qos=1)
            late = await mallory.receipts(2)
            gate.open()
            await serving

    replay_id = Update.from_bytes(replayed, max_bytes=10**8).update_id
    assert late[replay_id].status is ReceiptStatus.DUPLICATE
    assert late["old-version"].status is ReceiptStatus.STALE

    with Store(tmp_path / "attacked.sqlite") as store, Store(tmp_path / "clean.sqlite") as reference:
        folded = {r: set(store.accepted_ids(r)) for r in (1, 2)}
        recorded = {(row["update_id"], row["status"]) for row in store.receipts() if row["client_id"] == "mallory"}
        attacked_model = store.latest_checkpoint()
        clean_model = reference.latest_checkpoint()
    agents_ids = {r: {rc.update_id for a in agents for rc in a.stats.receipts if rc.round == r and rc.status is ReceiptStatus.ACCEPTED}
                  for r in (1, 2)}
    assert folded == agents_ids and all(len(ids) == 3 for ids in folded.values())
    assert ("nan-values", "rejected") in recorded and ("old-version", "stale") in recorded
    assert attacked.counters["rejected"] == len(cases) and attacked.counters["rejected:non_finite"] == 2
    assert attacked_model.version == clean_model.version == 2
    for name, values in clean_model.weights.items():
        np.testing.assert_allclose(attacked_model.weights[name], values, rtol=1e-6, atol=1e-7)
