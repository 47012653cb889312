"""The ``fedge`` command as a user runs it: real processes, exit codes, clean shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from aggregator.store import Store
from fedge_contract import RoundState, RoundStatus, Topics
from fedge_contract.mqtt import BrokerAddress
from tests.integration.fleet import raw_peer

FEDGE = [sys.executable, "-m", "fedge"]


async def _spawn(*args: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        *FEDGE, *args, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )


@contextlib.asynccontextmanager
async def processes() -> AsyncIterator[list[asyncio.subprocess.Process]]:
    """Children spawned in the block are killed when it ends, passed or failed: no orphans."""
    spawned: list[asyncio.subprocess.Process] = []
    try:
        yield spawned
    finally:
        for process in spawned:
            if process.returncode is None:
                process.kill()
                await process.wait()


@pytest.mark.integration
async def test_fedge_broker_serves_and_stops_cleanly_on_ctrl_c():
    async with processes() as spawned, asyncio.timeout(30):
        broker = await _spawn("broker")
        spawned.append(broker)
        line = (await broker.stdout.readline()).decode()
        assert line.startswith("mosquitto listening on mqtt://127.0.0.1:"), line
        url = line.split()[3]
        async with raw_peer(BrokerAddress.parse(url), "probe", "fl/x/status") as peer:
            await peer.client.publish("fl/x/status", b"hello", qos=1, retain=True)
            assert await peer.next_payload("fl/x/status") == b"hello"
        broker.send_signal(signal.SIGINT)
        assert await broker.wait() == 130
        # mosquitto went down with it: nothing listens any more
        with pytest.raises(OSError):
            await asyncio.open_connection("127.0.0.1", int(url.rsplit(":", 1)[1]))


@pytest.mark.integration
async def test_aggregator_and_agent_processes_run_a_round_and_exit(broker, fleet, tmp_path):
    common = [f"--broker={broker.url}", f"--fleet={fleet}", "--task=digits", "--task-opt=clients=2"]
    async with processes() as spawned, asyncio.timeout(90), raw_peer(BrokerAddress.parse(broker.url), "observer", Topics(fleet).status) as peer:
        aggregator = await _spawn("aggregator", *common, "--rounds=1", "--target=2", "--min=2", f"--store={tmp_path / 'agg.sqlite'}")
        spawned.append(aggregator)
        agents = []
        for i in range(2):
            # --policy=always: the default policy waits for an idle CPU, which a shared test machine is not
            agents.append(await _spawn("agent", *common, f"--client-id=agent-{i}", f"--state-dir={tmp_path / str(i)}",
                                       "--exit-when-final", "--policy=always"))
            spawned.append(agents[-1])
        status = RoundStatus.from_bytes(await peer.next_payload(Topics(fleet).status))
        while status.state is not RoundState.FINISHED:
            status = RoundStatus.from_bytes(await peer.next_payload(Topics(fleet).status))
        codes = [await p.wait() for p in (aggregator, *agents)]
    assert codes == [0, 0, 0], [(await p.stderr.read()).decode()[-500:] for p in (aggregator, *agents)]
    assert status.model_version == 1 and "accuracy" in status.last_metrics
    with Store(tmp_path / "agg.sqlite") as store:
        assert len(store.accepted_ids(1)) == 2


@pytest.mark.parametrize(
    "args, message",
    [
        (["aggregator", "--broker=ftp://x"], "scheme must be mqtt:// or mqtts://"),
        (["aggregator", "--broker=mqtt://h", "--target=2", "--min=3"], "min (3) <= target (2)"),
        (["aggregator", "--broker=mqtt://h", "--codec=zip"], "unknown stage 'zip'"),
        (["aggregator", "--broker=mqtt://h", "--workers=2", "--aggregation=median"], "--workers needs --aggregation mean"),
        (["agent", "--broker=mqtt://h", "--client-id=a/b", "--state-dir=/tmp/x"], "client id 'a/b'"),
        (["simulate", "--agents=0"], "--agents and --rounds must be >= 1"),
    ],
)
def test_bad_configuration_is_a_clear_error_not_a_traceback(args, message):
    done = subprocess.run([*FEDGE, *args], capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert done.returncode == 2
    assert message in done.stderr and "Traceback" not in done.stderr, done.stderr


def test_broker_admin_does_not_import_the_cli():
    """fedge.broker_admin once imported _run from fedge.cli (inside a function), which imports it back: a cycle."""
    import ast

    import fedge.broker_admin

    tree = ast.parse(Path(fedge.broker_admin.__file__).read_text())
    imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    imported |= {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    assert "fedge.cli" not in imported and "fedge" not in imported


def test_broker_add_device_with_a_certificate_prints_what_to_copy(tmp_path, capsys):
    from edge_agent.settings import LOADER
    from fedge.cli import build_parser, main

    folder = tmp_path / "broker"
    assert main(["broker", "init", "--tls", str(folder), "--auth", "both", "--host", "hub.local"]) == 0
    assert "add-device ID [--cert]" in capsys.readouterr().out
    assert main(["broker", "add-device", "pi-1", "--cert", "--config", str(folder)]) == 0
    out = capsys.readouterr().out
    assert "mqtts://hub.local:8884" in out and "--cert-file pi-1.crt --key-file pi-1.key" in out and "kill -HUP" in out
    assert (folder / "devices" / "pi-1" / "pi-1.key").exists()
    assert main(["broker", "remove-device", "pi-1", "--config", str(folder)]) == 0
    out = capsys.readouterr().out
    assert "its 1 certificate(s) revoked" in out and "password" not in out and not (folder / "devices" / "pi-1").exists()
    assert main(["broker", "add-device", "pi-2", "--config", str(folder)]) == 0
    assert main(["broker", "remove-device", "pi-2", "--config", str(folder)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert "device 'pi-2' removed: its password deleted" in out  # it never had a certificate
    args = build_parser().parse_args(["agent", "--cert-file", "/c.crt", "--key-file", "/c.key"])
    assert LOADER.flag_values(args)["cert_file"] == "/c.crt" and LOADER.flag_values(args)["key_file"] == "/c.key"
