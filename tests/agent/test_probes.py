"""Probes read fake sysfs/procfs trees of real files; termux and the CPU meter through their seams."""

from __future__ import annotations

import json
import logging
import os
import stat
from pathlib import Path

import pytest

from edge_agent.probes import CpuLoadMeter, DeviceProbe, read_metered, read_sysfs_power, read_temperature, read_termux_power
from tests.agent.sysfs import battery_device, gone_process, supply, thermal


def test_charging_battery(tmp_path):
    power = read_sysfs_power(battery_device(tmp_path, "Charging", 55, mains_online=True))
    assert power is not None and power.plugged and power.battery_percent == 55.0 and power.source == "sysfs"


def test_discharging_battery(tmp_path):
    power = read_sysfs_power(battery_device(tmp_path, "Discharging", 30, mains_online=False))
    assert power is not None and not power.plugged and power.battery_percent == 30.0


@pytest.mark.parametrize("status", ["Full", "Not charging"])
def test_full_or_held_at_a_limit_counts_as_plugged(tmp_path, status):
    power = read_sysfs_power(battery_device(tmp_path, status, 100))
    assert power is not None and power.plugged


def test_mains_online_wins_over_an_unknown_status(tmp_path):
    power = read_sysfs_power(battery_device(tmp_path, "Unknown", 70, mains_online=True))
    assert power is not None and power.plugged


def test_peripheral_battery_is_not_the_device(tmp_path):
    supply(tmp_path, "hid-mouse-battery", type="Battery", scope="Device", status="Discharging", capacity="5")
    assert read_sysfs_power(tmp_path) is None  # a desktop with a wireless mouse has no battery


def test_energy_fallback_when_capacity_missing(tmp_path):
    supply(tmp_path, "BAT1", type="Battery", status="Discharging", energy_now="25000000", energy_full="50000000")
    power = read_sysfs_power(tmp_path)
    assert power is not None and power.battery_percent == pytest.approx(50.0)


def test_no_battery_is_mains(tmp_path):
    supply(tmp_path, "AC", type="Mains", online="1")
    probe = DeviceProbe(sysfs=tmp_path, procfs=tmp_path, termux=False, psutil_battery=False)
    power = probe.power()
    assert power.plugged and not power.has_battery and power.source == "none"


def test_missing_sysfs_is_mains(tmp_path):
    probe = DeviceProbe(sysfs=tmp_path / "nothing", procfs=tmp_path, termux=False, psutil_battery=False)
    assert probe.power().plugged


def test_temperature_is_the_hottest_plausible_zone(tmp_path):
    thermal(tmp_path, 0, 41500)
    thermal(tmp_path, 1, 78250)
    thermal(tmp_path, 2, -273000)  # a disabled sensor
    thermal(tmp_path, 3, 0)
    assert read_temperature(tmp_path) == pytest.approx(78.25)
    assert read_temperature(tmp_path / "none") is None


@pytest.mark.parametrize(("iface", "metered"), [("wlan0", False), ("eth0", False), ("rmnet_data0", True), ("wwan0", True), ("tun0", None)])
def test_metered_by_default_route_interface(tmp_path, iface, metered):
    (tmp_path / "net").mkdir()
    (tmp_path / "net" / "route").write_text(
        "Iface\tDestination\tGateway\tFlags\n"
        "docker0\t0011A8C0\t00000000\t0001\n"
        f"{iface}\t00000000\t0101A8C0\t0003\n"
    )
    assert read_metered(tmp_path) is metered


def test_metered_unknown_without_procfs(tmp_path):
    assert read_metered(tmp_path) is None


def fake_termux(tmp_path, monkeypatch, reply: dict | str) -> None:
    script = tmp_path / "bin" / "termux-battery-status"
    script.parent.mkdir()
    body = reply if isinstance(reply, str) else json.dumps(reply)
    script.write_text(f"#!/bin/sh\ncat <<'JSON'\n{body}\nJSON\n")
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{script.parent}{os.pathsep}{os.environ['PATH']}")


def test_termux_battery_status(tmp_path, monkeypatch):
    fake_termux(tmp_path, monkeypatch, {"health": "GOOD", "percentage": 64, "plugged": "PLUGGED_USB", "status": "CHARGING", "temperature": 31.5})
    power = read_termux_power()
    assert power is not None and power.plugged and power.battery_percent == 64.0 and power.temperature_c == 31.5
    probe = DeviceProbe(sysfs=tmp_path / "hidden", procfs=tmp_path, termux=True, psutil_battery=False)
    snap = probe.read()
    assert snap.power.source == "termux" and snap.temperature_c == 31.5  # no thermal zone: the battery's


def test_termux_unplugged(tmp_path, monkeypatch):
    fake_termux(tmp_path, monkeypatch, {"percentage": 12, "plugged": "UNPLUGGED", "status": "DISCHARGING"})
    power = read_termux_power()
    assert power is not None and not power.plugged and power.battery_percent == 12.0


def test_termux_garbage_is_ignored(tmp_path, monkeypatch):
    fake_termux(tmp_path, monkeypatch, "not json")
    assert read_termux_power() is None


def test_cpu_meter_needs_two_samples_and_stays_in_range():
    ticks = iter([0.0, 5.0, 10.0])
    meter = CpuLoadMeter(window=60, clock=lambda: next(ticks))
    assert meter.sample() is None
    load = meter.sample()
    assert load is not None and 0.0 <= load <= 1.0


def test_cpu_meter_subtracts_the_agents_own_cpu(monkeypatch):
    """Training must not make the device look busy: the agent's own CPU time is not 'others'."""
    from typing import NamedTuple

    class Times(NamedTuple):
        user: float
        system: float
        idle: float
        iowait: float

    machine = iter([Times(0.0, 0.0, 100.0, 0.0), Times(1.0, 0.5, 100.5, 0.0)])  # 1.5 s busy in 1 s on 2 cores
    own = iter([0.0, 1.0])  # of which 1.0 s is the agent (and its training child)
    ticks = iter([0.0, 1.0])
    meter = CpuLoadMeter(window=60, clock=lambda: next(ticks))
    meter.cores = 2
    monkeypatch.setattr(meter._psutil, "cpu_times", lambda: next(machine))
    monkeypatch.setattr(meter, "_own_seconds", lambda: next(own))
    meter.sample()
    assert meter.sample() == pytest.approx(0.25)  # (1.5 - 1.0) / (1 s * 2 cores)


def test_snapshot_as_dict_is_flat_scalars(tmp_path):
    battery_device(tmp_path, "Discharging", 42, mains_online=False, temp_mc=51000)
    snap = DeviceProbe(sysfs=tmp_path, procfs=tmp_path, termux=False, psutil_battery=False).read()
    assert snap.as_dict() == {
        "charging": False, "battery": 42.0, "power_source": "sysfs", "temperature_c": 51.0, "cpu_load": None, "metered": None,
    }


# ---------------------------------------------------------------------- readings that fail
@pytest.fixture
def gone():
    return gone_process()


def test_a_cpu_meter_that_raises_makes_the_load_unknown_with_one_warning(tmp_path, gone, caplog):
    probe = DeviceProbe(sysfs=tmp_path, procfs=tmp_path, termux=False, psutil_battery=False, cpu=CpuLoadMeter(process=gone))
    with caplog.at_level(logging.WARNING, logger="fedge.probes"):
        snaps = [probe.read() for _ in range(3)]
    assert all(s.cpu_load is None and s.unknown["cpu_load"].startswith("NoSuchProcess") for s in snaps)
    assert snaps[0].power.source == "none" and "power" not in snaps[0].unknown  # the other readings still work
    assert [r.getMessage() for r in caplog.records if "cpu_load" in r.getMessage()] == [
        f"cannot read the device's cpu_load ({snaps[0].unknown['cpu_load']}): treating it as unknown until it reads again"
    ]
    assert snaps[0].as_dict()["unknown"].startswith("cpu_load: NoSuchProcess")


class ReusedPid(CpuLoadMeter):
    """The arm64 failure: psutil decides this agent's PID was reused, then recovers."""

    def __init__(self, failures: int) -> None:
        super().__init__(window=60)
        self.failures = failures

    def _own_seconds(self) -> float:
        import psutil

        if self.failures:
            self.failures -= 1
            raise psutil.NoSuchProcess(os.getpid(), msg="PID has been reused")
        return super()._own_seconds()


def test_a_reading_that_recovers_is_measured_again_and_said_once(tmp_path, caplog):
    probe = DeviceProbe(sysfs=tmp_path, procfs=tmp_path, termux=False, psutil_battery=False, cpu=ReusedPid(failures=2))
    with caplog.at_level(logging.INFO, logger="fedge.probes"):
        first, second, third, fourth = (probe.read() for _ in range(4))
    assert "PID has been reused" in first.unknown["cpu_load"] and "cpu_load" in second.unknown
    assert third.unknown == {} and third.cpu_load is None  # one good sample: the load needs two
    assert fourth.unknown == {} and fourth.cpu_load is not None
    messages = [r.getMessage() for r in caplog.records]
    assert sum("cannot read the device's cpu_load" in m for m in messages) == 1
    assert messages.count("the device's cpu_load reads again") == 1


def test_unreadable_sysfs_and_procfs_are_unknown(tmp_path, monkeypatch):
    from edge_agent import probes

    def unreadable(root: Path) -> None:
        raise PermissionError(13, "Permission denied", str(root))

    monkeypatch.setattr(probes, "read_temperature", unreadable)
    monkeypatch.setattr(probes, "read_metered", unreadable)
    monkeypatch.setattr(probes, "read_sysfs_power", unreadable)
    snap = DeviceProbe(sysfs=tmp_path, procfs=tmp_path, termux=False, psutil_battery=False).read()
    assert set(snap.unknown) == {"power", "temperature", "metered"}
    assert snap.power.source == "unknown" and snap.temperature_c is None and snap.metered is None
    assert "Permission denied" in snap.unknown["temperature"]


def test_a_failing_termux_call_is_unknown_power_asked_once_per_ttl(tmp_path, monkeypatch):
    script = tmp_path / "bin" / "termux-battery-status"
    script.parent.mkdir()
    script.write_text(f"#!/bin/sh\necho called >> {tmp_path / 'calls'}\necho 'Termux:API not installed' >&2\nexit 1\n")
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{script.parent}{os.pathsep}{os.environ['PATH']}")
    probe = DeviceProbe(sysfs=tmp_path / "hidden", procfs=tmp_path, termux=True, psutil_battery=False)
    first, second = probe.read(), probe.read()
    assert first.power.source == "unknown" and "termux-battery-status failed" in first.unknown["power"]
    assert second.unknown == first.unknown
    assert (tmp_path / "calls").read_text().count("called") == 1  # the failure is cached for termux_ttl too


def test_the_cpu_meter_samples_from_any_thread_when_start_times_are_per_thread(monkeypatch):
    """qemu-user (the arm64 check) answers a process's own start time with the calling thread's. The
    gate samples on executor threads, so a handle on this process kept from one sample to the next
    looked like a reused PID on another thread (NoSuchProcess). Faked at psutil's platform layer."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    import psutil

    platform = psutil._psplatform.Process
    real = platform.create_time
    started: dict[int, float] = {}  # thread -> the start time the fake reports to it (each thread its own)

    def per_thread(self, *args, **kwargs):
        value = real(self, *args, **kwargs)
        return value + started.setdefault(threading.get_ident(), len(started) / 10) if self.pid == os.getpid() else value

    monkeypatch.setattr(platform, "create_time", per_thread)
    meter = CpuLoadMeter(window=60)
    with ThreadPoolExecutor(1) as first, ThreadPoolExecutor(1) as second:
        loads = [pool.submit(meter.sample).result(timeout=30) for pool in (first, second, first, second)]
    assert sorted(started.values()) == [0.0, 0.1]  # two threads, two start times
    assert loads[0] is None and all(load is not None for load in loads[1:])
