"""Asynchronous (FedBuff) mode over a real Mosquitto: receipts, staleness weights, restart, a fleet."""

from __future__ import annotations

import asyncio
import math

import numpy as np
import pytest

from aggregator import Aggregator
from aggregator.store import Store
from edge_agent import Agent
from fedge_contract import GlobalModel, ReceiptStatus, Topics, Update
from fedge_contract.aio import cancel_and_wait
from fedge_contract.codecs import decode_weights, encode_weights, parse_chain
from fedge_contract.tensors import ModelSpec
from tests.integration.fleet import agent_config, aggregator_config, raw_peer, run_fleet

pytestmark = pytest.mark.integration


def update_payload(model: GlobalModel, client: str, update_id: str, base: int, value: float) -> bytes:
    delta = {t.name: np.full(t.shape, value, np.float32) for t in model.tensors}
    return Update(model.fleet, client, update_id, base + 1, base, 10, encode_weights(delta, parse_chain("none"))).to_bytes()


def weights_of(model: GlobalModel) -> dict[str, np.ndarray]:
    return decode_weights(model.tensors, ModelSpec.of({t.name: np.zeros(t.shape, np.float32) for t in model.tensors}))


async def test_receipts_and_staleness_weights(broker_address, fleet, tmp_path):
    """buffer_size 1, max_staleness 1: every accepted update makes a version; fedavg, so v+1 = v + f(s) * delta."""
    topics = Topics(fleet)
    config = aggregator_config(broker_address, fleet, tmp_path / "agg.sqlite", mode="async", buffer_size=1, max_staleness=1,
                               rounds=3, evaluate=False)
    async with asyncio.timeout(60), raw_peer(broker_address, "peer", topics.global_model, f"{topics.prefix}/receipts/+") as peer:
        serving = asyncio.create_task(Aggregator(config).run())
        try:
            v0 = await peer.first_model(topics)
            assert (v0.model_version, v0.round, v0.deadline) == (0, 1, None)
            assert v0.task.extra["mode"] == "async" and v0.task.extra["max_staleness"] == 1

            async def send(client: str, update_id: str, base: int, value: float = 0.0) -> ReceiptStatus:
                await peer.client.publish(topics.update(client), update_payload(v0, client, update_id, base, value), qos=1)
                return (await peer.receipts(1))[update_id].status

            assert await send("a", "u1", 0, 0.5) is ReceiptStatus.ACCEPTED  # s=0 -> v1
            assert await send("a", "u2", 0) is ReceiptStatus.DUPLICATE  # a already contributed on v0
            assert await send("b", "u3", 1, 0.25) is ReceiptStatus.ACCEPTED  # s=0 -> v2
            assert await send("c", "u4", 0) is ReceiptStatus.STALE  # s=2 > 1
            assert await send("b", "u3", 1, 0.25) is ReceiptStatus.DUPLICATE  # resent
            assert await send("d", "u5", 9) is ReceiptStatus.REJECTED  # a version that does not exist
            assert await send("e", "u6", 1, 1.0) is ReceiptStatus.ACCEPTED  # s=1 -> v3, weight 1/sqrt(2)
            await serving
        finally:
            await cancel_and_wait([serving])
    with Store(tmp_path / "agg.sqlite") as store:
        final = store.latest_checkpoint()
        rounds = store.rounds()
    assert final is not None and final.version == 3
    assert [(r["round"], r["base_version"], r["accepted"], r["deadline"]) for r in rounds] == [(1, 0, 1, None), (2, 1, 1, None), (3, 2, 1, None)]
    assert [r["metrics"]["staleness_max"] for r in rounds] == [0, 0, 1]
    step = 0.5 + 0.25 + 1.0 / math.sqrt(2)
    for name, w0 in weights_of(v0).items():
        np.testing.assert_allclose(final.weights[name], w0 + np.float32(step), atol=1e-5)


async def test_buffer_survives_a_restart(broker_address, fleet, tmp_path):
    """One update spooled into a buffer of two, aggregator stopped; a new one folds it with the next."""
    topics = Topics(fleet)
    config = aggregator_config(broker_address, fleet, tmp_path / "agg.sqlite", mode="async", buffer_size=2, rounds=1, evaluate=False)
    async with asyncio.timeout(60), raw_peer(broker_address, "peer", topics.global_model, f"{topics.prefix}/receipts/+") as peer:
        first = asyncio.create_task(Aggregator(config).run())
        v0 = await peer.first_model(topics)
        await peer.client.publish(topics.update("a"), update_payload(v0, "a", "u1", 0, 1.0), qos=1)
        assert (await peer.receipts(1))["u1"].status is ReceiptStatus.ACCEPTED
        await cancel_and_wait([first])

        second = asyncio.create_task(Aggregator(config).run())
        try:
            for client, uid in (("a", "u1"), ("b", "u2")):  # the resend of u1 is a duplicate: folded once
                await peer.client.publish(topics.update(client), update_payload(v0, client, uid, 0, 1.0), qos=1)
            # three receipts: the restart confirms the re-folded u1, its resend is a duplicate, u2 is accepted
            receipts = await peer.receipt_list(3)
            await second
        finally:
            await cancel_and_wait([second])
    by_update = sorted((r.update_id or "", r.status.value) for r in receipts)
    assert by_update == [("u1", ReceiptStatus.ACCEPTED.value), ("u1", ReceiptStatus.DUPLICATE.value), ("u2", ReceiptStatus.ACCEPTED.value)]
    with Store(tmp_path / "agg.sqlite") as store:
        final = store.latest_checkpoint()
    assert final is not None and final.version == 1
    for name, w0 in weights_of(v0).items():
        np.testing.assert_allclose(final.weights[name], w0 + 1.0, atol=1e-6)  # mean of two deltas of 1, s=0


async def test_fleet_in_async_mode(broker_address, fleet, tmp_path):
    config = aggregator_config(broker_address, fleet, tmp_path / "agg.sqlite", mode="async", buffer_size=3, max_staleness=2, rounds=4)
    aggregator = Aggregator(config)
    agents = [Agent(agent_config(broker_address, fleet, tmp_path, i)) for i in range(5)]
    async with asyncio.timeout(90):
        await run_fleet(aggregator, agents)

    with Store(tmp_path / "agg.sqlite") as store:
        rounds = store.rounds()
        accepted = {r["round"]: store.accepted_ids(r["round"]) for r in rounds}
        receipts = store.receipts()
    assert [(r["round"], r["accepted"]) for r in rounds] == [(1, 3), (2, 3), (3, 3), (4, 3)]
    assert all(0 <= r["metrics"]["staleness_max"] <= 2 for r in rounds)
    assert rounds[-1]["metrics"]["accuracy"] > 0.3  # 10 classes: chance is 0.1
    assert {r["status"] for r in receipts} <= {"accepted", "stale", "duplicate"}
    for agent in agents:
        assert agent.stats.trained_versions == sorted(set(agent.stats.trained_versions))
        for receipt in agent.stats.receipts:
            assert (receipt.status is ReceiptStatus.ACCEPTED) == (receipt.update_id in accepted.get(receipt.round, []))
