"""`fedge agent doctor` end to end: the real CLI in a subprocess, a real broker, a fake sysfs tree."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

import pytest

from tests.agent.sysfs import battery_device

pytestmark = pytest.mark.integration


async def doctor(tmp_path: Path, *args: str, env: dict[str, str] | None = None) -> tuple[int, str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("FEDGE_")}
    environ.update({"FEDGE_SYSFS_ROOT": str(tmp_path / "sys"), "FEDGE_PROCFS_ROOT": str(tmp_path / "proc"),
                    "FEDGE_POLICY_MAX_CPU_LOAD": "none"})  # others' load on a shared test machine is not ours to judge
    environ.update(env or {})
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "fedge", "agent", "doctor", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, env=environ,
    )
    async with asyncio.timeout(60):
        out, _ = await proc.communicate()
    return proc.returncode or 0, out.decode()


async def test_healthy_charging_device(broker, tmp_path):
    battery_device(tmp_path / "sys", "Charging", 77, mains_online=True, temp_mc=43000)
    config = tmp_path / "agent.toml"
    config.write_text(f'client_id = "agent-3"\nstate_dir = "{tmp_path / "state"}"\n[task_options]\nclients = "5"\n[policy]\npreset = "phone"\n')
    code, out = await doctor(tmp_path, "--broker", broker.url, "--config", str(config))
    assert code == 0, out
    assert "battery      77%, on external power (Charging, via sysfs)" in out
    assert "temperature  43.0 C" in out
    assert "eligible     yes" in out
    assert f"{broker.url.removeprefix('mqtt://')} reachable" in out
    assert "torch" in out and "1 thread(s)" in out
    assert "digits: " in out and "training samples on this device" in out
    assert (tmp_path / "state").is_dir()


async def test_unplugged_device_is_not_a_failure_but_says_why(broker, tmp_path):
    battery_device(tmp_path / "sys", "Discharging", 35, mains_online=False)
    code, out = await doctor(tmp_path, "--broker", broker.url, "--client-id", "agent-1", "--state-dir", str(tmp_path / "s"),
                             "--policy", "phone", "--task-opt", "clients=5")
    assert code == 0, out
    assert "eligible     no: not charging (battery 35%, Discharging)" in out


async def test_unreachable_broker_and_bad_config_fail_with_advice(tmp_path):
    code, out = await doctor(tmp_path, "--broker", "mqtt://127.0.0.1:9", env={"FEDGE_TORCH_THREADS": "0"})
    assert code == 1, out
    assert "FAIL  broker" in out and "unreachable" in out
    assert "FAIL  config" in out
    assert "to fix:" in out and "that the broker runs" in out
