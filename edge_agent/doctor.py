"""``fedge agent doctor``: what this device reports, whether it may train, and what is wrong.

It reads the same settings as the agent (file, environment, flags), runs every probe once (the
CPU load over ``load_seconds``), tries the broker, imports torch and loads the task, and prints
one line per check. Exit status: 0 when nothing is broken (a phone that is merely unplugged is
not broken), 1 with advice otherwise.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TextIO

from edge_agent.probes import CpuLoadMeter, DeviceProbe, DeviceSnapshot
from edge_agent.settings import RawSettings, SettingsError, build, build_policy


@dataclass
class Report:
    lines: list[tuple[str, str, str]] = field(default_factory=list)  # (level, check, detail)
    advice: list[str] = field(default_factory=list)

    def ok(self, check: str, detail: str) -> None:
        self.lines.append(("ok", check, detail))

    def info(self, check: str, detail: str) -> None:
        self.lines.append(("info", check, detail))

    def fail(self, check: str, detail: str, advice: str) -> None:
        self.lines.append(("FAIL", check, detail))
        self.advice.append(f"{check}: {advice}")

    @property
    def failed(self) -> bool:
        return bool(self.advice)

    def print(self, out: TextIO) -> None:
        for level, check, detail in self.lines:
            print(f"{level:>4}  {check:<12} {detail}", file=out)
        if self.advice:
            print("\nto fix:", file=out)
            for item in self.advice:
                print(f"  - {item}", file=out)


def run_doctor(raw: RawSettings, out: TextIO, *, load_seconds: float = 2.0, broker_timeout: float = 5.0) -> int:
    report = Report()
    try:
        settings = build(raw)
        report.ok("config", f"client {settings.agent.client_id}, fleet {settings.agent.fleet}, task {settings.agent.task}")
    except SettingsError as exc:
        settings = None
        report.fail("config", str(exc).replace("\n", " "), "fix the settings above (see deploy/README.md or `fedge agent --help`)")
    snapshot = _probe(raw, load_seconds)
    _device_lines(report, snapshot)
    try:
        policy = build_policy(raw)
        reasons = policy.reasons(snapshot, datetime.now())
        report.ok("policy", f"{policy.preset}: {policy.describe()}")
        if reasons:
            report.info("eligible", "no: " + "; ".join(reasons))
        else:
            report.ok("eligible", "yes: this device may train now")
    except SettingsError as exc:
        report.fail("policy", str(exc), "fix the [policy] table or the FEDGE_POLICY_* variables")
    if raw.get("broker") is not None:
        _check_broker(report, raw, broker_timeout)
    _check_torch(report, raw)
    if settings is not None:
        _check_state_dir(report, settings.agent.state_dir)
        _check_task(report, raw)
    report.print(out)
    return 1 if report.failed else 0


def _probe(raw: RawSettings, load_seconds: float) -> DeviceSnapshot:
    meter = CpuLoadMeter(window=max(load_seconds, 1.0))
    probe = DeviceProbe(sysfs=raw.get("sysfs_root"), procfs=raw.get("procfs_root"), cpu=meter)
    probe.read()
    time.sleep(load_seconds)  # a one-shot command: two samples a moment apart give the load
    return probe.read()


def _device_lines(report: Report, snap: DeviceSnapshot) -> None:
    power = snap.power
    if "power" in snap.unknown:
        report.info("battery", f"unknown: {snap.unknown['power']}")
    elif power.has_battery:
        report.ok("battery", f"{power.battery_percent:.0f}%, {'on external power' if power.plugged else 'discharging'} "
                             f"({power.status}, via {power.source})")
    else:
        report.ok("battery", "none found: treated as mains power")
    report.ok("temperature", f"{snap.temperature_c:.1f} C (hottest thermal zone)" if snap.temperature_c is not None
              else "unknown (no readable thermal zone)")
    report.ok("cpu load", f"{snap.cpu_load:.0%} of all cores used by other programs" if snap.cpu_load is not None
              else f"unknown: {snap.unknown.get('cpu_load', 'no second sample')}")
    network = {True: "metered (cellular)", False: "unmetered", None: "unknown"}[snap.metered]
    report.ok("network", network)


def _check_broker(report: Report, raw: RawSettings, timeout: float) -> None:
    from fedge_contract.errors import ConnectionLost
    from fedge_contract.mqtt import BrokerAddress, make_client

    address: BrokerAddress = raw.get("broker")
    files = {name: raw.get(name) for name in ("ca_file", "cert_file", "key_file") if raw.get(name) is not None}
    try:
        address = dataclasses.replace(address, **files)
    except ValueError as exc:  # a certificate without its key, or without mqtts://
        report.fail("broker", str(exc), "give --cert-file and --key-file together, with an mqtts:// broker URL")
        return

    async def connect() -> float:
        start = time.perf_counter()
        async with asyncio.timeout(timeout):
            async with make_client(address, f"fedge-doctor-{uuid.uuid4().hex[:8]}", persistent=False, timeout=timeout):
                return time.perf_counter() - start

    try:
        seconds = asyncio.run(connect())
        report.ok("broker", f"{address} reachable (MQTT 5 connect in {seconds * 1000:.0f} ms)")
    except (OSError, ConnectionLost) as exc:  # a failure to connect is the finding itself
        report.fail("broker", f"{address} unreachable: {exc or type(exc).__name__}",
                    "check the URL and port, that the broker runs (systemctl status mosquitto), the firewall, "
                    "and the username/password or --ca-file for mqtts://")


def _check_torch(report: Report, raw: RawSettings) -> None:
    try:
        import torch
    except ImportError as exc:
        report.fail("torch", f"cannot import torch: {exc}",
                    "pip install torch --index-url https://download.pytorch.org/whl/cpu (the CPU wheel; plain `torch` pulls CUDA)")
        return
    threads = raw.get("torch_threads")
    report.ok("torch", f"{torch.__version__}, training uses {threads} thread(s) of {os.cpu_count()} cores "
                       f"(torch's own default would be {torch.get_num_threads()}), niceness +{raw.get('train_nice')}")


def _check_state_dir(report: Report, state_dir: Path) -> None:
    try:
        state_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=state_dir, prefix=".doctor-"):
            pass
        free = os.statvfs(state_dir)
        report.ok("state dir", f"{state_dir} writable, {free.f_bavail * free.f_frsize / 2**30:.1f} GiB free")
    except OSError as exc:
        report.fail("state dir", f"{state_dir}: {exc.strerror or exc}", "create it and give the agent's user write access (systemd: StateDirectory=)")


def _check_task(report: Report, raw: RawSettings) -> None:
    from fedge_tasks import TaskLoadError, load_task

    try:
        task = load_task(raw.get("task"), raw.get("task_options"))
        model = task.build_model()
        data = task.train_data(raw.get("client_id"))
        params = sum(p.numel() for p in model.parameters())
        report.ok("task", f"{raw.get('task')}: {len(data)} training samples on this device, {params} parameters")
    except (TaskLoadError, ImportError, ValueError, OSError) as exc:
        report.fail("task", f"{raw.get('task')}: {exc}", "install the task's package in the agent's venv and check --task/--task-opt")
