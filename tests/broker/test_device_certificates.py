"""Device certificates against a real Mosquitto with the production config: issued, confined, revoked.

Measured here (Mosquitto 2.0.11): the broker reads crl.pem when it starts and again on SIGHUP;
between a revocation and the SIGHUP a revoked certificate still connects; a connection made
before the revocation stays open after the SIGHUP (the CRL is checked in the handshake only).
A certificate from another CA, none, or a password on the certificate listener are refused; the
ACL confines a certificate device to its own topics whatever client id it claims, alone
(``--auth certificate``) or beside password devices (``--auth both``).
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import signal
import sys
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


async def only_its_own_topics_get_through(observer: BrokerAddress, device: BrokerAddress, own: str, victim: str) -> None:
    """``device`` (a certificate, so its name is its certificate's) publishes as ``victim`` under every client id it
    likes, then on its own topic ``own``; the observer sees only the last message."""
    topics = Topics(FLEET)
    async with make_client(observer, "observer", persistent=False) as watching:
        await watching.subscribe(f"fl/{FLEET}/#", qos=1)
        forgeries = (topics.update(victim), topics.presence(victim), topics.global_model, topics.status, topics.receipt(own))
        for client_id in ("mallory", victim):
            for topic in forgeries:
                # denied: Mosquitto answers "not authorised" and the connection ends (see test_production_broker)
                with contextlib.suppress(ConnectionLost):
                    async with make_client(device, client_id, persistent=False) as mallory:
                        await mallory.publish(topic, b"forged", qos=1)
        async with make_client(device, own, persistent=False) as honest:
            await honest.publish(topics.update(own), b"sentinel", qos=1)
        seen = []
        async for message in watching.messages:
            if not message.retain:
                seen.append((str(message.topic), message.payload))
                if message.payload == b"sentinel":
                    break
        assert seen == [(topics.update(own), b"sentinel")]


async def test_a_certificate_device_connects_and_uses_only_its_own_topics(cert_broker, tmp_path):
    device = address(cert_broker.port, cert_broker.folder.add_certificate("dev-0"))
    cert_broker.folder.add_certificate("dev-1")
    async with asyncio.timeout(60):
        await only_its_own_topics_get_through(address(cert_broker.port, cert_broker.aggregator), device, "dev-0", "dev-1")


async def test_with_both_listeners_a_certificate_cannot_act_as_a_password_device(tmp_path):
    port, cert_port = free_port(), free_port()
    folder, aggregator = init(tmp_path / "broker", fleet=FLEET, host="127.0.0.1", port=port, bind="127.0.0.1", auth="both",
                              cert_port=cert_port)
    folder.add_account("pw-0")
    device = address(cert_port, folder.add_certificate("ct-0"))
    async with LocalBroker(port=port, data_dir=folder.path / "data", config_file=folder.config_file, tls=True), asyncio.timeout(60):
        await only_its_own_topics_get_through(address(port, aggregator), device, "ct-0", "pw-0")


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


async def test_a_connected_device_keeps_its_connection_after_revocation_until_it_reconnects(cert_broker, tmp_path):
    """What README's security section says an operator must know: the CRL is checked in the TLS handshake
    only, so revoking and reloading cuts off the next connection, not the current one."""
    topics = Topics(FLEET)
    folder = cert_broker.folder
    device = address(cert_broker.port, copied(folder.add_certificate("dev-0"), tmp_path / "dev-0"))
    observer = address(cert_broker.port, cert_broker.aggregator)
    async with asyncio.timeout(60), make_client(observer, "observer", persistent=False) as watching:
        await watching.subscribe(topics.update("dev-0"), qos=1)
        async with make_client(device, "dev-0", persistent=False) as connected:
            folder.remove_account("dev-0")
            await reload(cert_broker.broker)
            assert not await connects(device, "dev-0-again")  # a new connection with the revoked certificate
            await connected.publish(topics.update("dev-0"), b"still here", qos=1)  # the open one still works
            async for message in watching.messages:
                assert message.payload == b"still here"
                break
        assert not await connects(device, "dev-0")  # and once it has left, it cannot come back


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


# ------------------------------------------------------------------ as an operator runs it: fedge commands
FEDGE = [sys.executable, "-m", "fedge"]


@contextlib.asynccontextmanager
async def spawned(*args: str) -> AsyncIterator[asyncio.subprocess.Process]:
    """``fedge ARGS`` as a process, killed if still running when the block ends."""
    process = await asyncio.create_subprocess_exec(*FEDGE, *args, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
                                                   stderr=asyncio.subprocess.PIPE)
    try:
        yield process
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


class Lines:
    """A process's output lines as they come; ``wait_for`` wakes at each new one (no polling)."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self._changed = asyncio.Event()

    async def read(self, stream: asyncio.StreamReader) -> None:
        async for raw in stream:
            self.lines.append(raw.decode(errors="replace").rstrip())
            self._changed.set()

    async def wait_for(self, text: str, *, after: int = 0) -> None:
        while not any(text in line for line in self.lines[after:]):
            self._changed.clear()
            await self._changed.wait()


async def test_an_operator_serves_certificates_trains_over_them_and_revokes_one(tmp_path):
    """init --auth certificate, add-device --cert, serve; the aggregator and an agent as processes with
    --cert-file/--key-file train a round; remove-device and a SIGHUP to `fedge broker serve` refuse the
    device, and serve's log says so."""
    from fedge.cli import main

    port, folder = free_port(), tmp_path / "broker"
    assert main(["broker", "init", "--config", str(folder), "--auth", "certificate", "--fleet", FLEET, "--host", "127.0.0.1",
                 "--port", str(port), "--bind", "127.0.0.1"]) == 0
    assert main(["broker", "add-device", "pi-1", "--cert", "--config", str(folder)]) == 0
    device = copied(Credentials("pi-1", None, "", folder / "ca.crt", folder / "devices" / "pi-1" / "pi-1.crt",
                                folder / "devices" / "pi-1" / "pi-1.key"), tmp_path / "pi-1")
    hub = folder / "devices" / "fedge-aggregator"
    url, log = f"mqtts://127.0.0.1:{port}", Lines()
    async with asyncio.timeout(120), spawned("broker", "serve", "--config", str(folder)) as serve, asyncio.TaskGroup() as tasks:
        assert serve.stdout is not None and serve.stderr is not None
        banner = (await serve.stdout.readline()).decode()
        assert f"serving {url} with" in banner, banner
        reader = tasks.create_task(log.read(serve.stderr))
        common = ["--broker", url, "--fleet", FLEET, "--task=digits", "--task-opt=clients=2"]
        async with spawned("aggregator", *common, "--ca-file", str(hub / "ca.crt"), "--cert-file", str(hub / "fedge-aggregator.crt"),
                           "--key-file", str(hub / "fedge-aggregator.key"), "--rounds=1", "--target=1", "--min=1",
                           f"--store={tmp_path / 'agg.sqlite'}") as aggregator, \
                spawned("agent", *common, "--ca-file", str(device.ca_file), "--cert-file", str(device.cert_file), "--key-file",
                        str(device.key_file), "--client-id=pi-1", f"--state-dir={tmp_path / 'state'}", "--exit-when-final",
                        "--policy=always") as agent:
            codes = [await aggregator.wait(), await agent.wait()]
            assert codes == [0, 0], [(await p.stderr.read()).decode()[-800:] for p in (aggregator, agent)]  # type: ignore[union-attr]
        await log.wait_for("u'pi-1')")  # Mosquitto named the device by its certificate: "... as fedge-agent-pi-1 (p5, ..., u'pi-1')"

        assert main(["broker", "remove-device", "pi-1", "--config", str(folder)]) == 0
        before = len(log.lines)
        serve.send_signal(signal.SIGHUP)  # to fedge broker serve, which passes it on to Mosquitto
        await log.wait_for("Reloading config", after=before)
        before = len(log.lines)
        assert not await connects(address(port, device), "pi-1")
        await log.wait_for("certificate verify failed", after=before)
        serve.send_signal(signal.SIGINT)
        assert await serve.wait() == 130
        await reader
    with Store(tmp_path / "agg.sqlite") as store:
        assert [r["client_id"] for r in store.receipts() if r["status"] == "accepted"] == ["pi-1"]
