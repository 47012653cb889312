"""Device certificates against a real Mosquitto with the production config: issued, confined, revoked.

Measured here (Mosquitto 2.0.11): the broker reads crl.pem when it starts and again on SIGHUP;
between a revocation and the SIGHUP a revoked certificate still connects.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import pytest_asyncio

from aggregator import Aggregator
from aggregator.store import Store
from broker import LocalBroker
from broker.local import free_port
from broker.provision import AGGREGATOR_USER, BrokerFolder, Credentials, init
from edge_agent import Agent
from fedge_contract import Topics
from fedge_contract.mqtt import BrokerAddress, ConnectionLost, make_client
from tests.integration.fleet import agent_config, aggregator_config, run_fleet

pytestmark = pytest.mark.integration
FLEET = "certs"


def address(port: int, credentials: Credentials) -> BrokerAddress:
    """How a device connects with what add-device printed (certificate or password)."""
    return BrokerAddress("127.0.0.1", port, tls=True, username=None if credentials.cert_file else credentials.username,
                         password=credentials.password, ca_file=str(credentials.ca_file),
                         cert_file=str(credentials.cert_file) if credentials.cert_file else None,
                         key_file=str(credentials.key_file) if credentials.key_file else None)


def copied(credentials: Credentials, dest: Path) -> Credentials:
    """The files as the device holds them (remove-device deletes the broker folder's copy)."""
    assert credentials.cert_file is not None and credentials.key_file is not None
    shutil.copytree(credentials.cert_file.parent, dest)
    return Credentials(credentials.username, None, credentials.url, dest / "ca.crt", dest / credentials.cert_file.name,
                       dest / credentials.key_file.name)


async def connects(target: BrokerAddress, name: str) -> bool:
    """Whether the broker accepts the connection (a refused handshake is ConnectionLost)."""
    try:
        async with make_client(target, name, persistent=False, timeout=10):
            return True
    except ConnectionLost:
        return False


async def reload(broker: LocalBroker) -> None:
    """SIGHUP, then wait for Mosquitto's "Reloading config." line: it re-reads the files in that same
    loop iteration, before it accepts the next connection."""
    before = sum("Reloading config" in line for line in broker.log_lines)
    broker.reload()
    async with asyncio.timeout(10):
        await broker.wait_for_log(lambda lines: sum("Reloading config" in line for line in lines) != before)


@dataclass
class CertBroker:
    broker: LocalBroker
    folder: BrokerFolder
    port: int
    aggregator: Credentials


@pytest_asyncio.fixture(loop_scope="function")
async def cert_broker(tmp_path: Path) -> AsyncIterator[CertBroker]:
    port = free_port()
    folder, aggregator = init(tmp_path / "broker", fleet=FLEET, host="127.0.0.1", port=port, bind="127.0.0.1", auth="certificate")
    async with LocalBroker(port=port, data_dir=folder.path / "data", config_file=folder.config_file, tls=True) as running:
        yield CertBroker(running, folder, port, aggregator)


async def test_a_certificate_device_connects_and_uses_only_its_own_topics(cert_broker, tmp_path):
    topics = Topics(FLEET)
    device = address(cert_broker.port, cert_broker.folder.add_certificate("dev-0"))
    cert_broker.folder.add_certificate("dev-1")
    async with asyncio.timeout(40), make_client(address(cert_broker.port, cert_broker.aggregator), "observer", persistent=False) as observer:
        await observer.subscribe(f"fl/{FLEET}/#", qos=1)
        for topic in (topics.update("dev-1"), topics.presence("dev-1"), topics.global_model, topics.status, topics.receipt("dev-0")):
            # denied: Mosquitto answers "not authorised" and the connection ends (see test_production_broker)
            with contextlib.suppress(ConnectionLost):
                async with make_client(device, "mallory", persistent=False) as mallory:
                    await mallory.publish(topic, b"forged", qos=1)
        async with make_client(device, "dev-0", persistent=False) as own:
            await own.publish(topics.update("dev-0"), b"sentinel", qos=1)
        seen = []
        async for message in observer.messages:
            if not message.retain:
                seen.append((str(message.topic), message.payload))
                if message.payload == b"sentinel":
                    break
        assert seen == [(topics.update("dev-0"), b"sentinel")]


async def test_a_revoked_certificate_is_refused_once_the_broker_reloads(cert_broker, tmp_path):
    folder = cert_broker.folder
    revoked = address(cert_broker.port, copied(folder.add_certificate("dev-0"), tmp_path / "dev-0"))
    other = address(cert_broker.port, copied(folder.add_certificate("dev-1"), tmp_path / "dev-1"))
    async with asyncio.timeout(60):
        assert await connects(revoked, "dev-0")
        folder.remove_account("dev-0")
        assert "dev-0" not in folder.accounts() and "dev-1" in folder.accounts()
        assert await connects(revoked, "dev-0")  # the broker still holds the CRL it started with
        await reload(cert_broker.broker)
        assert not await connects(revoked, "dev-0")
        assert await connects(other, "dev-1")  # the other device is not affected
        # a second revocation: the CRL the broker reloads keeps the first one's entry
        folder.remove_account("dev-1")
        await reload(cert_broker.broker)
        assert not await connects(other, "dev-1") and not await connects(revoked, "dev-0")
        # re-adding the device issues a new certificate, which works while the old one stays revoked
        again = address(cert_broker.port, folder.add_certificate("dev-0"))
        assert await connects(again, "dev-0")
        assert not await connects(revoked, "dev-0")
    assert any("certificate verify failed" in line or "revoked" in line for line in cert_broker.broker.log_lines)


async def test_a_reissued_certificate_replaces_the_earlier_one(cert_broker, tmp_path):
    folder = cert_broker.folder
    first = address(cert_broker.port, copied(folder.add_certificate("dev-0"), tmp_path / "first"))
    second = address(cert_broker.port, folder.add_certificate("dev-0"))
    async with asyncio.timeout(30):
        await reload(cert_broker.broker)
        assert await connects(second, "dev-0")
        assert not await connects(first, "dev-0")  # a copied or lost key stops working


async def test_a_foreign_certificate_no_certificate_or_a_password_are_refused(cert_broker, tmp_path):
    stranger_folder, _ = init(tmp_path / "elsewhere", fleet=FLEET, host="127.0.0.1", port=free_port(), auth="certificate")
    foreign = stranger_folder.add_certificate("dev-0")  # the right name, another CA
    legit = cert_broker.folder.add_certificate("dev-0")
    async with asyncio.timeout(40):
        forged = BrokerAddress("127.0.0.1", cert_broker.port, tls=True, ca_file=str(legit.ca_file), cert_file=str(foreign.cert_file),
                               key_file=str(foreign.key_file))
        assert not await connects(forged, "dev-0")
        bare = BrokerAddress("127.0.0.1", cert_broker.port, tls=True, ca_file=str(legit.ca_file))
        assert not await connects(bare, "dev-0")
        password = BrokerAddress("127.0.0.1", cert_broker.port, tls=True, username="dev-0", password="guess", ca_file=str(legit.ca_file))
        assert not await connects(password, "dev-0")
        assert await connects(address(cert_broker.port, legit), "dev-0")


async def test_password_and_certificate_devices_train_together_on_their_own_listeners(tmp_path):
    port, cert_port = free_port(), free_port()
    folder, aggregator = init(tmp_path / "broker", fleet=FLEET, host="127.0.0.1", port=port, bind="127.0.0.1", auth="both",
                              cert_port=cert_port)
    with_password = folder.add_account("agent-0")
    with_certificate = folder.add_certificate("agent-1")
    assert with_certificate.url == f"mqtts://127.0.0.1:{cert_port}" and folder.accounts() == [AGGREGATOR_USER, "agent-0", "agent-1"]
    options = {"clients": "2", "alpha": "0.5"}
    agents = [
        Agent(agent_config(address(port, with_password), FLEET, tmp_path / "agents", 0, task_options=options)),
        Agent(agent_config(address(cert_port, with_certificate), FLEET, tmp_path / "agents", 1, task_options=options)),
    ]
    config = aggregator_config(address(port, aggregator), FLEET, tmp_path / "agg.sqlite", rounds=1, target=2, min_updates=2,
                               task_options=options)
    async with LocalBroker(port=port, data_dir=folder.path / "data", config_file=folder.config_file, tls=True):
        async with asyncio.timeout(90):
            # each kind is refused on the other's listener
            assert not await connects(address(cert_port, with_password), "agent-0")
            assert not await connects(address(port, with_certificate), "agent-1")
            await run_fleet(Aggregator(config), agents)
    with Store(tmp_path / "agg.sqlite") as store:
        assert sorted(r["client_id"] for r in store.receipts() if r["status"] == "accepted") == ["agent-0", "agent-1"]
