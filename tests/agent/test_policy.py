"""Policy decisions against fake sysfs trees (charging, discharging, full, hot, no battery), times and TOML."""

from __future__ import annotations

import asyncio
import dataclasses
from datetime import datetime
from pathlib import Path

import pytest

from edge_agent import settings
from edge_agent.conditions import PolicyGate
from edge_agent.policy import PRESETS, Policy, PolicyError, TimeWindow, policy_from_mapping
from edge_agent.probes import UNKNOWN_POWER, CpuLoadMeter, DeviceProbe, DeviceSnapshot
from tests.agent.sysfs import battery_device, supply, thermal

NOON = datetime(2024, 5, 1, 12, 0)


def snapshot(root: Path, cpu_load: float | None = None) -> DeviceSnapshot:
    snap = DeviceProbe(sysfs=root, procfs=root, termux=False, psutil_battery=False).read()
    return DeviceSnapshot(snap.power, snap.temperature_c, cpu_load, snap.metered, snap.taken_at)


def test_phone_charging_and_cool_may_train(tmp_path):
    snap = snapshot(battery_device(tmp_path, "Charging", 60, mains_online=True, temp_mc=35000), cpu_load=0.1)
    assert PRESETS["phone"].reasons(snap, NOON) == []


def test_phone_discharging_may_not(tmp_path):
    snap = snapshot(battery_device(tmp_path, "Discharging", 90, mains_online=False, temp_mc=35000), cpu_load=0.1)
    assert PRESETS["phone"].reasons(snap, NOON) == ["not charging (battery 90%, Discharging)"]


def test_full_battery_on_the_charger_may_train(tmp_path):
    snap = snapshot(battery_device(tmp_path, "Full", 100, temp_mc=30000), cpu_load=0.0)
    assert PRESETS["phone"].reasons(snap, NOON) == []


def test_hot_device_may_not(tmp_path):
    snap = snapshot(battery_device(tmp_path, "Charging", 80, mains_online=True, temp_mc=82500), cpu_load=0.0)
    assert PRESETS["phone"].reasons(snap, NOON) == ["hot: 82.5 C (max 45 C)"]
    assert PRESETS["laptop"].reasons(snap, NOON) == []  # laptops run warm: only their throttling zone counts


def test_no_battery_is_mains_for_every_preset(tmp_path):
    supply(tmp_path, "AC", type="Mains", online="1")
    thermal(tmp_path, 0, 40000)
    snap = snapshot(tmp_path, cpu_load=0.05)
    for name in ("phone", "laptop", "pi", "always"):
        assert PRESETS[name].reasons(snap, NOON) == [], name


def test_pi_hot_and_busy_gives_both_reasons(tmp_path):
    thermal(tmp_path, 0, 79000)
    snap = snapshot(tmp_path, cpu_load=0.8)
    assert PRESETS["pi"].reasons(snap, NOON) == ["busy: other programs use 80% of the CPU (max 50%)", "hot: 79.0 C (max 70 C)"]


def test_low_battery_floor_even_while_charging(tmp_path):
    snap = snapshot(battery_device(tmp_path, "Charging", 10, mains_online=True), cpu_load=0.0)
    assert PRESETS["phone"].reasons(snap, NOON) == ["battery 10% is below the 20% floor"]


def test_unknown_readings_never_block(tmp_path):
    snap = snapshot(tmp_path)  # no battery, no thermal zone, no load yet, no network info
    assert PRESETS["phone"].reasons(snap, NOON) == []


def test_metered_network(tmp_path):
    (tmp_path / "net").mkdir()
    (tmp_path / "net" / "route").write_text("Iface\tDestination\nrmnet0\t00000000\n")
    snap = snapshot(tmp_path)
    assert PRESETS["phone"].reasons(snap, NOON) == ["on a metered (cellular) network"]
    assert PRESETS["pi"].reasons(snap, NOON) == []


@pytest.mark.parametrize(("hour", "inside"), [(23, True), (2, True), (6, True), (7, False), (12, False), (21, False)])
def test_window_wrapping_midnight(tmp_path, hour, inside):
    policy = Policy(require_charging=False, max_cpu_load=None, max_temperature_c=None, windows=(TimeWindow.parse("22:00-07:00"),))
    reasons = policy.reasons(snapshot(tmp_path), datetime(2024, 5, 1, hour, 30))
    assert (reasons == []) is inside
    if not inside:
        assert reasons == [f"outside the training window 22:00-07:00 (now {hour:02d}:30)"]


def test_mapping_picks_a_preset_and_overrides():
    policy, preset = policy_from_mapping({"preset": "pi", "max_temperature_c": 65, "windows": ["01:00-05:00"]}, has_battery=False)
    assert preset == "pi" and policy.max_temperature_c == 65.0 and str(policy.windows[0]) == "01:00-05:00"
    assert policy.max_cpu_load == PRESETS["pi"].max_cpu_load


def test_mapping_from_strings_like_env_vars():
    policy, _ = policy_from_mapping({"preset": "always", "require_charging": "yes", "max_cpu_load": "0.3", "windows": "22:00-06:00,12:00-13:00"},
                                    has_battery=True)
    assert policy.require_charging is True and policy.max_cpu_load == 0.3 and len(policy.windows) == 2


def test_auto_preset(monkeypatch):
    monkeypatch.delenv("ANDROID_ROOT", raising=False)
    monkeypatch.setenv("PATH", "/nonexistent")
    assert policy_from_mapping({}, has_battery=False)[1] == "pi"
    assert policy_from_mapping({}, has_battery=True)[1] == "laptop"
    monkeypatch.setenv("ANDROID_ROOT", "/system")
    assert policy_from_mapping({}, has_battery=True)[1] == "phone"


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ({"preset": "toaster"}, "preset 'toaster' is unknown"),
        ({"max_temp": 50}, "max_temp unknown"),
        ({"min_battery": 150}, "min_battery must be 0-100"),
        ({"max_cpu_load": 30}, "fraction of all cores"),
        ({"windows": ["7pm-8pm"]}, "must look like 'HH:MM-HH:MM'"),
        ({"require_charging": "maybe"}, "must be true or false"),
        ({"max_temperature_c": "hot"}, "must be a number"),
    ],
)
def test_invalid_policy_says_what_to_fix(table, message):
    with pytest.raises(PolicyError, match=message):
        policy_from_mapping(table, has_battery=False)


# ---------------------------------------------------------------------- settings (file < env < flags)
def write_config(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "agent.toml"
    path.write_text(text)
    return path


def test_settings_precedence(tmp_path):
    config = write_config(tmp_path, f"""
broker = "mqtt://file-host:1883"
client_id = "pi-7"
state_dir = "{tmp_path / 'state'}"
torch_threads = 2
sysfs_root = "{tmp_path / 'sys'}"
[task_options]
clients = 20
[policy]
preset = "pi"
max_temperature_c = 65
""")
    env = {"FEDGE_BROKER": "mqtt://env-host:1883", "FEDGE_TRAIN_NICE": "5", "FEDGE_POLICY_MAX_CPU_LOAD": "0.2"}
    flags = {"broker": None, "torch_threads": 3, "policy": {"max_temperature_c": 60.0}}
    loaded = settings.load(flags, config_file=config, environ=env)
    assert loaded.agent.broker.host == "env-host"  # env beats the file
    assert loaded.agent.torch_threads == 3  # a flag beats the file
    assert loaded.agent.train_nice == 5 and loaded.agent.isolate_training is True
    assert loaded.agent.task_options == {"clients": "20"}
    assert loaded.preset == "pi" and loaded.policy.max_temperature_c == 60.0 and loaded.policy.max_cpu_load == 0.2


def test_settings_config_from_env_var(tmp_path):
    config = write_config(tmp_path, 'broker = "h"\nclient_id = "a-1"\nstate_dir = "/tmp/x"\n')
    loaded = settings.load({}, environ={"FEDGE_CONFIG": str(config)})
    assert loaded.agent.client_id == "a-1" and loaded.agent.broker.port == 1883


@pytest.mark.parametrize(
    ("text", "env", "message"),
    [
        ('broker = "h"\n', {}, "(?s)missing setting.*client_id.*FEDGE_CLIENT_ID"),
        ('brokr = "h"\n', {}, "unknown setting.*brokr"),
        ('broker = "h"\nclient_id = "a"\nstate_dir = "/x"\ntorch_threads = "two"\n', {}, "torch_threads.*must be an integer"),
        ('broker = "h"\nclient_id = "a"\nstate_dir = "/x"\n', {"FEDGE_TRAIN_NICE": "40"}, "train_nice must be 0-19"),
        ('broker = "h"\nclient_id = "bad id!"\nstate_dir = "/x"\n', {}, "client id"),
        ('broker = "h"\nclient_id = "a"\nstate_dir = "/x"\n', {"FEDGE_ISOLATE_TRAINING": "perhaps"}, "FEDGE_ISOLATE_TRAINING.*true or false"),
        ("broker = \n", {}, "not valid TOML"),
        ('broker = "h"\nclient_id = "a"\nstate_dir = "/x"\n[policy]\npreset = "toaster"\n', {}, "preset 'toaster'"),
        ('broker = "h"\nclient_id = "a"\nstate_dir = "/x"\n', {"FEDGE_KEY_FILE": "/k"},
         "needs both cert_file and key_file, got only key_file .key_file from FEDGE_KEY_FILE."),
    ],
)
def test_settings_errors_are_clear(tmp_path, text, env, message):
    with pytest.raises(settings.SettingsError, match=message):
        settings.load({}, config_file=write_config(tmp_path, text), environ=env)


def test_missing_config_file(tmp_path):
    with pytest.raises(settings.SettingsError, match="cannot read the config file"):
        settings.load({}, config_file=tmp_path / "nope.toml", environ={})


# ---------------------------------------------------------------------- unknown readings
def unknown(root: Path, **reasons: str) -> DeviceSnapshot:
    snap = snapshot(root)
    power = UNKNOWN_POWER if "power" in reasons else snap.power
    return DeviceSnapshot(power, None, None, None, snap.taken_at, reasons)


@pytest.mark.parametrize(("preset", "blocked"), [("phone", True), ("laptop", True), ("pi", False), ("always", False)])
def test_unknown_power_blocks_only_a_policy_that_cares_about_power(tmp_path, preset, blocked):
    reasons = PRESETS[preset].reasons(unknown(tmp_path, power="RuntimeError: termux-battery-status failed"), NOON)
    expected = ["power unknown (RuntimeError: termux-battery-status failed): not training on a battery it cannot see"]
    assert reasons == (expected if blocked else [])


def test_a_battery_floor_alone_also_refuses_unknown_power(tmp_path):
    policy = dataclasses.replace(PRESETS["pi"], min_battery=30.0)
    assert policy.reasons(unknown(tmp_path, power="OSError: EIO"), NOON) == [
        "power unknown (OSError: EIO): not training on a battery it cannot see"]


def test_unknown_load_temperature_and_network_never_block(tmp_path):
    snap = unknown(tmp_path, cpu_load="NoSuchProcess: PID has been reused", temperature="OSError: EIO", metered="OSError: EIO")
    for name in ("phone", "laptop", "pi"):
        policy = dataclasses.replace(PRESETS[name], require_charging=False, min_battery=0.0, require_unmetered=True)
        assert policy.reasons(snap, NOON) == [], name


class BrokenMeter(CpuLoadMeter):
    def sample(self) -> float | None:
        import psutil

        raise psutil.NoSuchProcess(1, msg="PID has been reused")


async def test_a_gate_whose_cpu_meter_fails_lets_a_pi_train(tmp_path):
    probe = DeviceProbe(sysfs=tmp_path, procfs=tmp_path, termux=False, psutil_battery=False, cpu=BrokenMeter())
    async with asyncio.timeout(30), PolicyGate(PRESETS["pi"], probe, sample_seconds=3600) as gate:
        assert gate.eligible(), gate.why_not()  # not "measuring the CPU load" forever
        assert gate.device()["unknown"] == "cpu_load: NoSuchProcess: PID has been reused (pid=1)"


def test_client_certificate_from_the_file_the_environment_or_flags(tmp_path):
    config = write_config(tmp_path, 'broker = "mqtts://hub:8884"\nclient_id = "pi-7"\nstate_dir = "/x"\n'
                                    'ca_file = "/etc/fedge/ca.crt"\ncert_file = "/etc/fedge/pi-7.crt"\nkey_file = "/etc/fedge/pi-7.key"\n')
    broker = settings.load({}, config_file=config, environ={}).agent.broker
    assert (broker.ca_file, broker.cert_file, broker.key_file) == ("/etc/fedge/ca.crt", "/etc/fedge/pi-7.crt", "/etc/fedge/pi-7.key")
    broker = settings.load({"key_file": "/flag.key"}, config_file=config, environ={"FEDGE_CERT_FILE": "/env.crt"}).agent.broker
    assert (broker.cert_file, broker.key_file) == ("/env.crt", "/flag.key")


async def test_flips_while_nobody_waits_are_not_lost(tmp_path):
    """The agent publishes its presence after each flip; a flip back that happens while it publishes must
    still wake it, or its presence keeps saying "not eligible" although the device is plugged in again."""
    root = battery_device(tmp_path, "Charging", 60, mains_online=True, temp_mc=35000)
    probe = DeviceProbe(sysfs=root, procfs=root, termux=False, psutil_battery=False)
    policy = Policy(require_charging=True, max_cpu_load=None, max_temperature_c=70.0)
    async with asyncio.timeout(30), PolicyGate(policy, probe, sample_seconds=3600) as gate:
        assert await gate.refresh() is True
        battery_device(tmp_path, "Discharging", 60, mains_online=False, temp_mc=35000)
        assert await gate.refresh() is False  # unplugged: nobody is waiting yet
        await gate.wait_change()  # the flip is not lost
        battery_device(tmp_path, "Charging", 60, mains_online=True, temp_mc=35000)
        assert await gate.refresh() is True  # replugged while the agent would be publishing
        await gate.wait_change()  # returns at once: the second flip is not lost either
        assert gate.eligible()
