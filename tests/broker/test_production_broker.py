"""The production broker config, run by a real Mosquitto: TLS, accounts and per-device ACLs."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import pytest_asyncio

from aggregator import Aggregator
from aggregator.store import Store
from broker import LocalBroker
from broker.local import free_port
from broker.provision import AGGREGATOR_USER, BrokerFolder, init
from edge_agent import Agent
from fedge_contract import Topics, Update
from fedge_contract.codecs import encode_weights, parse_chain
from fedge_contract.mqtt import BrokerAddress, ConnectionLost, make_client
from tests.integration.fleet import agent_config, aggregator_config

pytestmark = pytest.mark.integration
FLEET = "secure"


@dataclass
class Production:
    broker: LocalBroker
    folder: BrokerFolder
    accounts: dict[str, BrokerAddress]  # username -> mqtts address with its password

    def address(self, username: str | None = None, password: str | None = None) -> BrokerAddress:
        base = self.accounts[AGGREGATOR_USER]
        return dataclasses.replace(base, username=username, password=password)


@pytest_asyncio.fixture(loop_scope="function")
async def production(tmp_path: Path) -> AsyncIterator[Production]:
    port = free_port()
    folder, aggregator = init(tmp_path / "broker", fleet=FLEET, host="127.0.0.1", port=port, bind="127.0.0.1")
    credentials = [aggregator] + [folder.add_account(name) for name in ("agent-0", "agent-1")]
    accounts = {
        c.username: BrokerAddress("127.0.0.1", port, tls=True, username=c.username, password=c.password, ca_file=str(c.ca_file))
        for c in credentials
    }
    async with LocalBroker(port=port, data_dir=folder.path / "data", config_file=folder.config_file, tls=True) as running:
        yield Production(running, folder, accounts)


async def _connect(address: BrokerAddress, name: str) -> None:
    async with make_client(address, name, persistent=False, timeout=5):
        pass


async def test_anonymous_wrong_password_and_plain_tcp_are_refused(production):
    async with asyncio.timeout(30):
        await _connect(production.accounts["agent-0"], "ok")  # the right password over TLS works
        with pytest.raises(ConnectionLost):
            await _connect(production.address(), "anonymous")
        with pytest.raises(ConnectionLost):
            await _connect(production.address("agent-0", "not-the-password"), "guesser")
        with pytest.raises(ConnectionLost):
            await _connect(production.address("nobody", production.accounts["agent-0"].password), "stranger")
        plain = dataclasses.replace(production.accounts["agent-0"], tls=False)
        with pytest.raises(ConnectionLost):
            await _connect(plain, "plain")
    assert any("not authorised" in line.lower() or "bad user name or password" in line.lower() for line in production.broker.log_lines)


async def test_a_device_publishes_only_as_itself_and_reads_only_its_own_topics(production):
    topics = Topics(FLEET)
    async with asyncio.timeout(30), \
            make_client(production.accounts[AGGREGATOR_USER], "observer", persistent=False) as observer, \
            make_client(production.accounts["agent-1"], "victim", persistent=False) as victim:
        await observer.subscribe(f"fl/{FLEET}/#", qos=1)
        # agent-1 tries to read agent-0's receipts and updates, and the whole fleet
        for topic in (topics.receipt("agent-0"), topics.update("agent-0"), f"fl/{FLEET}/#", topics.receipt("agent-1")):
            await victim.subscribe(topic, qos=1)
        forged = {
            topics.update("agent-1"): b"update as agent-1",
            topics.presence("agent-1"): b"presence as agent-1",
            topics.evals("agent-1"): b"an evaluation as agent-1",
            topics.global_model: b"a global model",
            topics.status: b"a status",
            topics.receipt("agent-1"): b"a receipt for agent-1",
            "fl/other-fleet/updates/agent-0": b"another fleet",
        }
        for topic, payload in forged.items():
            # Mosquitto answers a denied QoS 1 publish with PUBACK "not authorised" and the connection
            # then ends (paho 2.2 over MQTT 5): one connection per attempt, each awaited to its end.
            with contextlib.suppress(ConnectionLost):
                async with make_client(production.accounts["agent-0"], "mallory", persistent=False) as mallory:
                    await mallory.publish(topic, payload, qos=1)
        async with make_client(production.accounts["agent-0"], "mallory", persistent=False) as mallory:
            await mallory.publish(topics.evals("agent-0"), b"own evaluation", qos=1)  # allowed: its own topics
            await mallory.publish(topics.update("agent-0"), b"sentinel", qos=1)
        seen = []
        async for message in observer.messages:  # one publisher, one subscriber: delivered in order
            seen.append((str(message.topic), message.payload))
            if message.payload == b"sentinel":
                break
        assert seen == [(topics.evals("agent-0"), b"own evaluation"), (topics.update("agent-0"), b"sentinel")]

        # the aggregator answers both devices; agent-1 gets only its own receipt
        await observer.publish(topics.receipt("agent-0"), b"for agent-0", qos=1)
        await observer.publish(topics.receipt("agent-1"), b"for agent-1", qos=1)
        received = []
        async for message in victim.messages:
            received.append((str(message.topic), message.payload))
            if message.payload == b"for agent-1":
                break
        assert received == [(topics.receipt("agent-1"), b"for agent-1")]


async def test_fleet_trains_over_tls_and_a_forged_update_never_reaches_the_aggregator(production, tmp_path):
    topics = Topics(FLEET)
    config = aggregator_config(production.accounts[AGGREGATOR_USER], FLEET, tmp_path / "agg.sqlite", rounds=1, target=2, min_updates=2,
                               task_options={"clients": "2", "alpha": "0.5"})
    aggregator = Aggregator(config)
    agents = [
        Agent(agent_config(production.accounts[f"agent-{i}"], FLEET, tmp_path / "agents", i, task_options={"clients": "2", "alpha": "0.5"}))
        for i in range(2)
    ]
    async with asyncio.timeout(90), make_client(production.accounts["agent-0"], "mallory", persistent=False) as mallory:
        await mallory.subscribe(topics.global_model, qos=1)
        serving = asyncio.create_task(aggregator.run())
        async for message in mallory.messages:
            if str(message.topic) == topics.global_model and message.payload:
                break
        # a well-formed update claiming to be agent-1, on agent-1's topic: only the broker can stop it
        zeros = {t.name: np.zeros(t.shape, np.float32) for t in aggregator.model.spec.tensors}
        forged = Update(FLEET, "agent-1", "forged", 1, 0, 10, encode_weights(zeros, parse_chain("none")))
        await mallory.publish(topics.update("agent-1"), forged.to_bytes(), qos=1)
        await run_fleet_with(serving, agents)
    with Store(tmp_path / "agg.sqlite") as store:
        receipts = store.receipts()
        assert {row["client_id"] for row in receipts if row["status"] == "accepted"} == {"agent-0", "agent-1"}
        assert all(row["update_id"] != "forged" for row in receipts)
        assert store.latest_checkpoint().version == 1
    assert all(a.stats.receipts and a.stats.receipts[0].status.value == "accepted" for a in agents)


async def test_chunked_models_and_updates_pass_the_acl_and_chunks_stay_each_devices_own(production, tmp_path):
    topics = Topics(FLEET)
    options, small = {"clients": "2", "alpha": "0.5"}, 16 * 1024  # digits in float32: three chunks each way
    config = aggregator_config(production.accounts[AGGREGATOR_USER], FLEET, tmp_path / "agg.sqlite", rounds=1, target=2, min_updates=2,
                               task_options=options, training={"codec": "none"}, max_message_bytes=small)
    aggregator = Aggregator(config)
    agents = [Agent(agent_config(production.accounts[f"agent-{i}"], FLEET, tmp_path / "agents", i, task_options=options,
                                 max_message_bytes=small)) for i in range(2)]
    async with asyncio.timeout(90):
        await run_fleet_with(asyncio.create_task(aggregator.run()), agents)
    assert all([r.status.value for r in a.stats.receipts] == ["accepted"] for a in agents)

    async with asyncio.timeout(30), make_client(production.accounts[AGGREGATOR_USER], "observer", persistent=False) as observer:
        await observer.subscribe(f"fl/{FLEET}/#", qos=1)
        for topic in (f"{topics.update_chunks('agent-1', 'forged')}/0", f"{topics.global_chunks(1)}/0", f"{topics.global_chunks(7)}/0"):
            with contextlib.suppress(ConnectionLost):  # denied: the connection ends (see above)
                async with make_client(production.accounts["agent-0"], "mallory", persistent=False) as mallory:
                    await mallory.publish(topic, b"forged chunk", qos=1, retain=True)
        async with make_client(production.accounts["agent-0"], "mallory", persistent=False) as mallory:
            await mallory.publish(f"{topics.update_chunks('agent-0', 'own')}/0", b"sentinel", qos=1)  # its own: allowed
        seen = []
        async for message in observer.messages:
            if not message.retain:  # skip the retained state sent on subscribing
                seen.append((str(message.topic), message.payload))
                if message.payload == b"sentinel":
                    break
        assert seen == [(f"{topics.update_chunks('agent-0', 'own')}/0", b"sentinel")]


async def run_fleet_with(serving: asyncio.Task, agents: list[Agent]) -> None:
    async with asyncio.TaskGroup() as group:
        for agent in agents:
            group.create_task(agent.run())
        await serving


def test_provisioned_folder_is_complete_and_keys_are_private(tmp_path):
    folder, aggregator = init(tmp_path / "b", fleet="f1", host="broker.example", port=8883)
    device = folder.add_account("dev-1")
    assert {p.name for p in folder.path.iterdir()} >= {
        "ca.crt", "ca.key", "server.crt", "server.key", "passwd", "acl", "mosquitto.conf", "fleet.json"}
    assert (folder.path / "ca.key").stat().st_mode & 0o077 == 0 and (folder.path / "server.key").stat().st_mode & 0o077 == 0
    assert folder.accounts() == [AGGREGATOR_USER, "dev-1"]
    assert device.password not in (folder.path / "passwd").read_text()  # stored hashed
    assert device.url == "mqtts://broker.example:8883" and aggregator.username == AGGREGATOR_USER
    acl = (folder.path / "acl").read_text()
    assert "pattern write fl/f1/updates/%u" in acl and "pattern read fl/f1/receipts/%u" in acl
    assert "pattern write fl/f1/updates/%u/#" in acl and "pattern read fl/f1/global/#" in acl  # chunked messages
    assert "pattern write fl/f1/secagg/up/+/%u" in acl and "pattern read fl/f1/secagg/down/+/%u" in acl  # secure aggregation
    assert "pattern write fl/f1/evals/%u" in acl  # federated evaluation reports
    folder.remove_account("dev-1")
    assert folder.accounts() == [AGGREGATOR_USER]
    with pytest.raises(RuntimeError):
        folder.remove_account(AGGREGATOR_USER)
    with pytest.raises(RuntimeError):
        init(tmp_path / "b")  # never overwrite a provisioned folder (its CA)
