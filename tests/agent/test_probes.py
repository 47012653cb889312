"""Probes read fake sysfs/procfs trees of real files; termux and the CPU meter through their seams."""

from __future__ import annotations

import json
import os
import stat

import pytest

from edge_agent.probes import CpuLoadMeter, DeviceProbe, read_metered, read_sysfs_power, read_temperature, read_termux_power
from tests.agent.sysfs import battery_device, supply, thermal


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
    from collections import namedtuple

    Times = namedtuple("Times", "user system idle iowait")
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
