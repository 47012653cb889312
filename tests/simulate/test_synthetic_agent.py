"""A synthetic agent against a real Mosquitto, with the test playing the aggregator."""

from __future__ import annotations

import asyncio

import numpy as np

from fedge.simulate.synthetic import DeltaPool, Ledger, SyntheticAgent
from fedge_contract import GlobalModel, Presence, Receipt, ReceiptStatus, TaskConfig, Topics, Update
from fedge_contract.codecs import decode_weights, encode_weights, parse_chain
from fedge_contract.tensors import ModelSpec
from tests.integration.fleet import raw_peer

WEIGHTS = {"layers.0.weight": np.zeros((30, 40), np.float32), "layers.0.bias": np.zeros(40, np.float32)}
SPEC = ModelSpec.of(WEIGHTS)


def model(fleet: str, round_no: int, *, final: bool = False) -> bytes:
    return GlobalModel(
        fleet=fleet, model_version=round_no - 1, round=round_no, deadline=None, task=TaskConfig(codec="q8+zstd"),
        fingerprint=SPEC.fingerprint, tensors=encode_weights(WEIGHTS, parse_chain("none")), final=final,
    ).to_bytes()


async def test_follows_rounds_with_the_rounds_codec_resends_until_its_receipt_and_exits_on_the_final_model(broker_address, fleet):
    topics = Topics(fleet)
    ledger = Ledger()
    async with asyncio.timeout(30), raw_peer(broker_address, f"{fleet}-agg", topics.all_updates, topics.all_presence) as peer:
        agent = SyntheticAgent("agent-1", broker_address, fleet, DeltaPool(2, seed=5), downloads="all", ledger=ledger)
        running = asyncio.create_task(agent.run())
        assert Presence.from_bytes(await peer.next_payload(topics.presence("agent-1"))).state == "online"

        await peer.client.publish(topics.global_model, model(fleet, 1), qos=1, retain=True)
        first = Update.from_bytes(await peer.next_payload(topics.update("agent-1")), max_bytes=2**20, fleet=fleet)
        assert (first.round, first.base_version, first.client_id) == (1, 0, "agent-1")
        assert {t.codec for t in first.tensors} == {"q8+zstd"}  # the codec the round asked for
        delta = np.concatenate([v.ravel() for v in decode_weights(first.tensors, SPEC).values()])
        assert delta.size == 1240 and 0.007 < delta.std() < 0.013  # N(0, 0.01^2), like a real delta

        await peer.client.publish(topics.global_model, model(fleet, 1), qos=1, retain=True)  # re-announced: no receipt yet
        again = Update.from_bytes(await peer.next_payload(topics.update("agent-1")), max_bytes=2**20, fleet=fleet)
        assert again.update_id == first.update_id and again.to_bytes() == first.to_bytes()

        receipt = Receipt(fleet, "agent-1", first.update_id, ReceiptStatus.ACCEPTED, "", 1, 0)
        await peer.client.publish(topics.receipt("agent-1"), receipt.to_bytes(), qos=1)
        await peer.client.publish(topics.global_model, model(fleet, 1), qos=1, retain=True)  # answered: nothing to resend
        await peer.client.publish(topics.global_model, model(fleet, 2), qos=1, retain=True)
        second = Update.from_bytes(await peer.next_payload(topics.update("agent-1")), max_bytes=2**20, fleet=fleet)
        assert (second.round, second.base_version) == (2, 1) and second.update_id != first.update_id

        await peer.client.publish(topics.global_model, model(fleet, 3, final=True), qos=1, retain=True)
        await running
        assert Presence.from_bytes(await peer.next_payload(topics.presence("agent-1"))).state == "offline"
    assert ledger.rounds[1]["updates"] == 2 and ledger.rounds[1]["bytes"] == 2 * len(first.to_bytes())
    assert ledger.rounds[1]["accepted"] == 1 and ledger.rounds[1]["accepted_bytes"] == len(first.to_bytes())
    assert ledger.rounds[2]["updates"] == 1 and ledger.superseded == 1  # round 2's update never got its receipt
    assert dict(ledger.receipts) == {"accepted": 1}


async def test_only_invited_synthetic_agents_send_and_asked_ones_report_evaluations(broker_address, fleet):
    from fedge_contract.cohort import EVAL_ALL, InviteSet, Participation
    from fedge_contract.evaluation import EvalReport

    topics = Topics(fleet)
    ledger = Ledger()
    cohort = Participation(InviteSet.of(["agent-2"], fleet=fleet, round_no=1, bits=16), EVAL_ALL)
    announcement = GlobalModel(
        fleet=fleet, model_version=0, round=1, deadline=None, task=TaskConfig(codec="q8+zstd"),
        fingerprint=SPEC.fingerprint, tensors=encode_weights(WEIGHTS, parse_chain("none")), cohort=cohort,
    )
    async with asyncio.timeout(30), raw_peer(broker_address, f"{fleet}-agg", topics.all_updates, topics.all_evals) as peer:
        agents = [SyntheticAgent(f"agent-{i}", broker_address, fleet, DeltaPool(2), downloads="all", ledger=ledger) for i in (1, 2)]
        running = [asyncio.create_task(a.run()) for a in agents]
        await asyncio.gather(*(a.connected.wait() for a in agents))
        await peer.client.publish(topics.global_model, announcement.to_bytes(), qos=1, retain=True)
        updates, evals = [], []
        async for message in peer.client.messages:
            assert isinstance(message.payload, bytes)
            if "/evals/" in str(message.topic):
                evals.append(EvalReport.from_bytes(message.payload, fleet=fleet))
            else:
                updates.append(Update.from_bytes(message.payload, max_bytes=2**20, fleet=fleet))
            if len(evals) == 2 and updates:
                break
        assert [u.client_id for u in updates] == ["agent-2"]
        assert sorted(e.client_id for e in evals) == ["agent-1", "agent-2"] and {e.model_version for e in evals} == {0}
        refusal = Receipt(fleet, "agent-2", updates[0].update_id, ReceiptStatus.REJECTED, "not_invited: test", 1, 0)
        await peer.client.publish(topics.receipt("agent-2"), refusal.to_bytes(), qos=1)
        await peer.client.publish(topics.global_model, model(fleet, 2, final=True), qos=1, retain=True)
        await asyncio.gather(*running)
    assert ledger.rounds[1]["trained"] == 1 and ledger.rounds[1]["evals"] == 2
    assert ledger.rounds[1]["uninvited"] == 1 and ledger.reasons["not_invited"] == 1
    assert ledger.rounds[1]["model_first"] <= ledger.rounds[1]["model_last"] and ledger.rounds[1]["model_first"] > 0
