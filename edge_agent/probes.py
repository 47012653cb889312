"""What the device reports about itself: power, temperature, CPU load of other programs, network.

Every probe reads files or asks a tool once per call and never loops: the gate calls them on a
timer of seconds, so a waiting agent costs nothing in between. The sysfs and procfs roots are
parameters, so tests point them at a fake tree of real files.

Sources, in order of trust:
- ``<sysfs>/class/power_supply/*``: ``type``, ``status``, ``capacity``, ``online`` (Linux, Pi, most Androids);
- ``termux-battery-status`` (Termux:API) where Android hides sysfs from apps;
- ``psutil.sensors_battery()`` on macOS/Windows laptops;
- none of them: no battery, i.e. mains power (a Pi, a desktop, a server).

A reading that fails (a psutil error, an unreadable sysfs or procfs file, a termux call that
fails) never stops the agent: ``DeviceProbe.read`` records that condition as unknown, with the
reason, in ``DeviceSnapshot.unknown``; it warns once when a condition starts failing and once when
it recovers, not on every sample. What an unknown condition means is the policy's decision
(edge_agent/policy.py).
"""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

log = logging.getLogger("fedge.probes")

# What reading the device may raise: the OS's interfaces (sysfs, procfs, a termux tool, psutil)
# fail in ways of their own on some devices; any of these makes that one reading unknown.
PROBE_ERRORS: tuple[type[Exception], ...] = (OSError, ValueError, RuntimeError, subprocess.SubprocessError, psutil.Error)

# Batteries that are not the device's own (mice, keyboards, phones' styluses) say scope=Device.
_PLUGGED_STATUSES = {"charging", "full", "not charging"}
_METERED_PREFIXES = ("rmnet", "wwan", "ccmni", "ppp", "wwp", "usb", "v4-rmnet")
_UNMETERED_PREFIXES = ("wlan", "wlp", "wl", "eth", "enp", "eno", "ens", "enx", "en", "br", "lo")


@dataclass(frozen=True)
class PowerReading:
    """The device's power: ``battery_percent`` None means it has no battery (mains powered)."""

    plugged: bool  # on external power (charging, full, or held at a charge limit)
    battery_percent: float | None = None
    status: str = "no battery"  # the source's own words: Charging, Discharging, Full, ...
    source: str = "none"  # sysfs | termux | psutil | none
    temperature_c: float | None = None  # the battery's, when the source gives it

    @property
    def has_battery(self) -> bool:
        return self.battery_percent is not None


@dataclass(frozen=True)
class DeviceSnapshot:
    """One reading of every probe; None where this device cannot tell."""

    power: PowerReading
    temperature_c: float | None
    cpu_load: float | None  # fraction of all cores used by other programs over the load window
    metered: bool | None
    taken_at: float  # unix seconds
    # condition ("power", "temperature", "cpu_load", "metered") -> why its reading failed
    unknown: Mapping[str, str] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        """Flat scalars for Presence/Update ``device`` (JSON-friendly, None where unknown)."""
        device: dict[str, Any] = {
            "charging": self.power.plugged,
            "battery": self.power.battery_percent,
            "power_source": self.power.source,
            "temperature_c": None if self.temperature_c is None else round(self.temperature_c, 1),
            "cpu_load": None if self.cpu_load is None else round(self.cpu_load, 3),
            "metered": self.metered,
        }
        if self.unknown:  # why a reading is missing, for `fedge status` and the dashboard
            device["unknown"] = "; ".join(f"{name}: {reason}" for name, reason in sorted(self.unknown.items()))
        return device


# A power reading that failed: neither plugged nor a battery level is known.
UNKNOWN_POWER = PowerReading(plugged=False, status="unknown", source="unknown")


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except (OSError, UnicodeDecodeError):
        return None


def _number(text: str | None) -> float | None:
    try:
        return float(text) if text is not None else None
    except ValueError:
        return None


def read_sysfs_power(sysfs: Path) -> PowerReading | None:
    """Power from ``<sysfs>/class/power_supply``; None when no system battery is listed there."""
    root = sysfs / "class" / "power_supply"
    try:
        supplies = sorted(p for p in root.iterdir() if p.is_dir())
    except OSError:
        return None
    capacities: list[float] = []
    statuses: list[str] = []
    external_online = False
    for supply in supplies:
        kind = (_read(supply / "type") or "").lower()
        if kind == "battery":
            if (_read(supply / "scope") or "").lower() == "device":
                continue  # a peripheral's battery, not ours
            status = _read(supply / "status") or "Unknown"
            statuses.append(status)
            capacity = _number(_read(supply / "capacity"))
            if capacity is None:  # some batteries only give energy_now/energy_full
                now, full = _number(_read(supply / "energy_now")), _number(_read(supply / "energy_full"))
                capacity = 100.0 * now / full if now is not None and full else None
            if capacity is not None:
                capacities.append(max(0.0, min(100.0, capacity)))
        elif _read(supply / "online") == "1":
            external_online = True  # Mains, USB, Wireless, USB_PD...
    if not statuses:
        return None
    plugged = external_online or any(s.lower() in _PLUGGED_STATUSES for s in statuses)
    percent = sum(capacities) / len(capacities) if capacities else 0.0
    return PowerReading(plugged=plugged, battery_percent=percent, status="/".join(statuses), source="sysfs")


def read_termux_power(command: str = "termux-battery-status", timeout: float = 15.0) -> PowerReading | None:
    """Android through Termux:API; None when the tool is missing or fails (it prints JSON)."""
    try:
        return termux_power(command, timeout)
    except RuntimeError as exc:
        log.warning("%s", exc)
        return None


def termux_power(command: str = "termux-battery-status", timeout: float = 15.0) -> PowerReading | None:
    """Android through Termux:API; None when the tool is missing, RuntimeError when it fails."""
    exe = shutil.which(command)
    if exe is None:
        return None
    try:
        out = subprocess.run([exe], capture_output=True, timeout=timeout, check=True, text=True).stdout
        data = json.loads(out)
        plugged_raw = str(data.get("plugged", "UNPLUGGED")).upper()
        status = str(data.get("status", "UNKNOWN"))
        percent = float(data["percentage"])
    except (OSError, subprocess.SubprocessError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise RuntimeError(f"termux-battery-status failed ({exc or type(exc).__name__}): is the Termux:API app installed?") from exc
    plugged = plugged_raw != "UNPLUGGED" or status.upper() in ("CHARGING", "FULL")
    temperature = _number(str(data.get("temperature"))) if data.get("temperature") is not None else None
    return PowerReading(plugged=plugged, battery_percent=percent, status=status, source="termux", temperature_c=temperature)


def read_psutil_power() -> PowerReading | None:
    """macOS/Windows laptops (on Linux psutil reads the same sysfs files we already read)."""
    try:
        import psutil

        battery = psutil.sensors_battery()
    except (ImportError, AttributeError, OSError, RuntimeError):
        return None
    if battery is None:
        return None
    plugged = bool(battery.power_plugged) if battery.power_plugged is not None else False
    return PowerReading(plugged=plugged, battery_percent=float(battery.percent), status="psutil", source="psutil")


def read_temperature(sysfs: Path) -> float | None:
    """The hottest plausible thermal zone in degrees C (a Pi throttles near 80-85 C)."""
    hottest: float | None = None
    for temp in sorted((sysfs / "class" / "thermal").glob("thermal_zone*/temp")):
        value = _number(_read(temp))
        if value is None:
            continue
        celsius = value / 1000.0 if abs(value) >= 1000 else value  # sysfs gives millidegrees; a few drivers degrees
        if 0.0 < celsius < 150.0:  # disabled sensors report 0, -273 or garbage
            hottest = celsius if hottest is None else max(hottest, celsius)
    return hottest


def read_metered(procfs: Path) -> bool | None:
    """Whether the default route goes over a metered link (cellular), judged by interface name."""
    text = _read(procfs / "net" / "route")
    if text is None:
        return None
    for line in text.splitlines()[1:]:
        fields = line.split()
        if len(fields) >= 2 and fields[1] == "00000000":  # default route
            name = fields[0]
            if name.startswith(_METERED_PREFIXES):
                return True
            if name.startswith(_UNMETERED_PREFIXES):
                return False
            return None
    return None


class CpuLoadMeter:
    """CPU load of *other* programs over a sliding window, from two cheap counters.

    Load = (busy CPU time of the machine - CPU time of this agent and its training child) over
    wall time x cores: the agent's own training must not make the device look busy and stop it.
    ``sample()`` is called on the gate's timer; nothing here spins. A sample that cannot be taken
    raises (psutil.Error, OSError) and leaves the window as it was; the probe reports it unknown.
    """

    def __init__(self, window: float = 60.0, clock: Callable[[], float] = time.monotonic,
                 process: psutil.Process | None = None) -> None:
        self._psutil = psutil
        self._process = process  # None: this process, a fresh handle each sample (see _own_seconds)
        self.window = window
        self._clock = clock
        self._samples: deque[tuple[float, float, float]] = deque()
        self.cores = psutil.cpu_count() or 1

    def _own_seconds(self) -> float:
        # Our own process gets a new handle every sample: its PID cannot have been reused while we
        # run, and a kept handle only adds psutil's reuse check, which compares the start time read
        # when the handle was made with one read now. Under qemu-user (the arm64 check) that start
        # time is the *calling thread's*, and samples run on executor threads: a kept handle made
        # on one thread raised NoSuchProcess ("PID has been reused") on the next.
        me = self._process or psutil.Process()
        times = me.cpu_times()
        children = me.children(recursive=True)
        total = times.user + times.system + times.children_user + times.children_system
        for child in children:
            try:
                ct = child.cpu_times()
                total += ct.user + ct.system
            except psutil.Error:
                pass  # exited between listing and reading; its time moves to children_*
        return total

    def sample(self) -> float | None:
        """Record a sample; the load over the window (None until two samples exist)."""
        cpu = self._psutil.cpu_times()
        idle = cpu.idle + getattr(cpu, "iowait", 0.0)
        busy = sum(cpu) - idle - getattr(cpu, "guest", 0.0) - getattr(cpu, "guest_nice", 0.0)
        own = self._own_seconds()
        now = self._clock()
        self._samples.append((now, busy, own))
        while len(self._samples) > 2 and now - self._samples[1][0] >= self.window:
            self._samples.popleft()
        return self.load()

    def load(self) -> float | None:
        if len(self._samples) < 2:
            return None
        (t0, busy0, own0), (t1, busy1, own1) = self._samples[0], self._samples[-1]
        if t1 <= t0:
            return None
        others = (busy1 - busy0) - (own1 - own0)
        return max(0.0, min(1.0, others / ((t1 - t0) * self.cores)))


@dataclass
class DeviceProbe:
    """Reads every probe; the roots and the fallbacks are configurable (tests use a fake tree)."""

    sysfs: Path = Path("/sys")
    procfs: Path = Path("/proc")
    termux: bool = True  # ask termux-battery-status when sysfs lists no battery
    psutil_battery: bool = sys.platform not in ("linux", "android")
    termux_ttl: float = 60.0  # the tool starts an Android service: ask at most once a minute
    cpu: CpuLoadMeter | None = None

    def __post_init__(self) -> None:
        self._termux_cache: tuple[float, PowerReading | RuntimeError | None] | None = None
        self._failing: dict[str, str] = {}  # condition -> reason, while its readings fail

    def power(self) -> PowerReading:
        """Raises (PROBE_ERRORS) when a source that exists fails; ``read`` turns that into unknown."""
        reading = read_sysfs_power(self.sysfs)
        if reading is None and self.termux:
            reading = self._termux()
        if reading is None and self.psutil_battery:
            reading = read_psutil_power()
        return reading or PowerReading(plugged=True)  # no battery: mains power

    def _termux(self) -> PowerReading | None:
        now = time.monotonic()
        if self._termux_cache is None or now - self._termux_cache[0] >= self.termux_ttl:
            try:
                self._termux_cache = (now, termux_power())
            except RuntimeError as exc:  # a failure is cached too: the tool is not asked again within the ttl
                self._termux_cache = (now, exc)
        cached = self._termux_cache[1]
        if isinstance(cached, RuntimeError):
            raise cached
        return cached

    def read(self) -> DeviceSnapshot:
        """Every probe once; a reading that fails is None (UNKNOWN_POWER) with its reason in ``unknown``."""
        unknown: dict[str, str] = {}
        power = self._guard("power", self.power, unknown) or UNKNOWN_POWER
        temperature = self._guard("temperature", lambda: read_temperature(self.sysfs), unknown)
        if temperature is None:
            temperature = power.temperature_c
        cpu_load = self._guard("cpu_load", self.cpu.sample, unknown) if self.cpu is not None else None
        metered = self._guard("metered", lambda: read_metered(self.procfs), unknown)
        self._tell(unknown)
        return DeviceSnapshot(power, temperature, cpu_load, metered, time.time(), unknown)

    @staticmethod
    def _guard(name: str, reading: Callable[[], Any], unknown: dict[str, str]) -> Any:
        try:
            return reading()
        except PROBE_ERRORS as exc:
            unknown[name] = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            return None

    def _tell(self, unknown: Mapping[str, str]) -> None:
        """One warning when a condition starts failing, one line when it recovers; nothing per sample."""
        for name, reason in unknown.items():
            if name not in self._failing:
                log.warning("cannot read the device's %s (%s): treating it as unknown until it reads again", name, reason)
        for name in set(self._failing) - set(unknown):
            log.info("the device's %s reads again", name)
        self._failing = dict(unknown)


def default_probe(load_window: float = 60.0, sysfs: Path = Path("/sys"), procfs: Path = Path("/proc")) -> DeviceProbe:
    """This machine's probes with a CPU meter; the roots move for containers or tests."""
    return DeviceProbe(sysfs=sysfs, procfs=procfs, cpu=CpuLoadMeter(load_window))
