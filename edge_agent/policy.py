"""When a device may train, as data: a Policy read from TOML and a pure decision function.

``Policy.reasons(snapshot, now)`` returns why the device may not train (empty: it may). It is a
pure function of one DeviceSnapshot and a clock reading, so every rule is tested against fake
sysfs trees and fixed times; the gate (conditions.py) only decides when to take snapshots.

Presets give sensible defaults per kind of device; a TOML ``[policy]`` table picks one and
overrides fields::

    [policy]
    preset = "phone"          # phone | laptop | pi | always | auto (default)
    min_battery = 30
    windows = ["22:00-07:00"]

A reading the device could not take is *unknown* (``DeviceSnapshot.unknown`` says why, and the
agent's presence carries it). What that means is decided per condition, by what a wrong guess costs:

- power unknown: blocks while the policy cares about power (``require_charging`` or a
  ``min_battery`` floor): training on a battery it cannot see could drain a phone or a laptop. A
  policy that does not care (``pi``, ``always``) trains on;
- CPU load unknown: never blocks. The load only tells whether the owner is busy; a meter that
  keeps failing must not stop a ``pi`` forever (the training child is niced anyway);
- temperature unknown: never blocks, as on a device without thermal zones (the SoC throttles
  itself; blocking would stop every device whose sensors cannot be read);
- network unknown: never blocks (``require_unmetered`` applies only where the link is known).
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, time
from typing import Any

from edge_agent.errors import AgentError
from edge_agent.probes import DeviceSnapshot
from fedge_runtime.settings import Loader, SettingsError


class PolicyError(AgentError, ValueError):
    """A policy setting is invalid; the message names the setting and the accepted values."""


@dataclass(frozen=True)
class TimeWindow:
    """Local wall-clock hours ``start-end``; ``22:00-07:00`` wraps past midnight."""

    start: time
    end: time

    @classmethod
    def parse(cls, text: str) -> TimeWindow:
        try:
            first, second = (part.strip() for part in text.split("-"))
            return cls(time.fromisoformat(first), time.fromisoformat(second))
        except ValueError:
            raise PolicyError(f"policy window {text!r} must look like 'HH:MM-HH:MM' (e.g. '22:00-07:00')") from None

    def contains(self, moment: time) -> bool:
        if self.start <= self.end:
            return self.start <= moment < self.end
        return moment >= self.start or moment < self.end

    def __str__(self) -> str:
        return f"{self.start:%H:%M}-{self.end:%H:%M}"


_NOT_SHOWN = {"show_default": False}  # the preset decides the default, not the dataclass


def _meta(help: str, **more: Any) -> dict[str, Any]:
    return {"help": help, **_NOT_SHOWN, **more}


@dataclass(frozen=True)
class Policy:
    """When this device may train; the metadata are its ``[policy]`` settings' flags (fedge_runtime/settings.py)."""

    require_charging: bool = field(default=True, metadata=_meta("train only on external power (a device without a battery counts as mains)"))
    min_battery: float = field(default=0.0, metadata=_meta("battery floor in percent; only checked on devices with a battery", metavar="PERCENT"))
    max_cpu_load: float | None = field(default=0.5, metadata=_meta(
        "of all cores, used by other programs (e.g. 0.3; none: ignore)", metavar="FRACTION"))
    load_window: float = field(default=60.0, metadata=_meta("seconds the CPU load is averaged over (idle for a while)", metavar="SECONDS"))
    max_temperature_c: float | None = field(default=75.0, metadata=_meta(
        "hottest thermal zone (none: ignore)", flag="--max-temperature", metavar="C"))
    windows: tuple[TimeWindow, ...] = field(default=(), metadata=_meta(
        "train only in this local time window (repeatable; none given: any time)", flag="--window", metavar="HH:MM-HH:MM",
        parse=TimeWindow.parse))
    require_unmetered: bool = field(default=False, metadata=_meta("train only off metered (cellular) networks, where detectable"))
    preset: str = field(default="auto", metadata={
        "flag": "--policy", "env": "FEDGE_POLICY", "help": "preset the other fields start from: auto, phone, laptop, pi, always"})

    def __post_init__(self) -> None:
        if not 0.0 <= self.min_battery <= 100.0:
            raise PolicyError(f"policy min_battery must be 0-100 (percent), got {self.min_battery}")
        if self.max_cpu_load is not None and not 0.0 < self.max_cpu_load <= 1.0:
            raise PolicyError(f"policy max_cpu_load is a fraction of all cores in (0, 1], got {self.max_cpu_load}")
        if self.load_window < 1.0:
            raise PolicyError(f"policy load_window must be >= 1 second, got {self.load_window}")
        if self.max_temperature_c is not None and not 20.0 <= self.max_temperature_c <= 120.0:
            raise PolicyError(f"policy max_temperature_c must be 20-120 C, got {self.max_temperature_c}")

    def reasons(self, snapshot: DeviceSnapshot, now: datetime) -> list[str]:
        """Why the device may not train now; empty when it may."""
        out: list[str] = []
        power = snapshot.power
        if "power" in snapshot.unknown:
            if self.require_charging or self.min_battery > 0:
                out.append(f"power unknown ({snapshot.unknown['power']}): not training on a battery it cannot see")
        elif self.require_charging and not power.plugged:
            out.append(f"not charging (battery {power.battery_percent:.0f}%, {power.status})")
        if power.has_battery and power.battery_percent is not None and power.battery_percent < self.min_battery:
            out.append(f"battery {power.battery_percent:.0f}% is below the {self.min_battery:.0f}% floor")
        if self.max_cpu_load is not None and snapshot.cpu_load is not None and snapshot.cpu_load > self.max_cpu_load:
            out.append(f"busy: other programs use {snapshot.cpu_load:.0%} of the CPU (max {self.max_cpu_load:.0%})")
        if self.max_temperature_c is not None and snapshot.temperature_c is not None and snapshot.temperature_c > self.max_temperature_c:
            out.append(f"hot: {snapshot.temperature_c:.1f} C (max {self.max_temperature_c:.0f} C)")
        if self.windows and not any(w.contains(now.time()) for w in self.windows):
            spans = ", ".join(str(w) for w in self.windows)
            out.append(f"outside the training window {spans} (now {now:%H:%M})")
        if self.require_unmetered and snapshot.metered:
            out.append("on a metered (cellular) network")
        return out

    def describe(self) -> str:
        parts = ["charging" if self.require_charging else "any power"]
        if self.min_battery:
            parts.append(f"battery >= {self.min_battery:.0f}%")
        if self.max_cpu_load is not None:
            parts.append(f"others' CPU <= {self.max_cpu_load:.0%} over {self.load_window:.0f} s")
        if self.max_temperature_c is not None:
            parts.append(f"<= {self.max_temperature_c:.0f} C")
        if self.windows:
            parts.append("windows " + ", ".join(str(w) for w in self.windows))
        if self.require_unmetered:
            parts.append("unmetered network")
        return ", ".join(parts)


PRESETS: dict[str, Policy] = {
    # charging and idle, battery kept cool, no cellular data
    "phone": Policy(require_charging=True, min_battery=20.0, max_cpu_load=0.25, max_temperature_c=45.0, require_unmetered=True,
                    preset="phone"),
    # plugged in and idle; laptop SoCs run warm, so only the throttling zone counts
    "laptop": Policy(require_charging=True, min_battery=50.0, max_cpu_load=0.3, max_temperature_c=90.0, preset="laptop"),
    # mains powered: idle and cool (a Pi throttles near 80-85 C)
    "pi": Policy(require_charging=False, max_cpu_load=0.5, max_temperature_c=70.0, preset="pi"),
    # servers and simulations: whenever there is work
    "always": Policy(require_charging=False, max_cpu_load=None, max_temperature_c=None, preset="always"),
}


def on_android() -> bool:
    return "ANDROID_ROOT" in os.environ or shutil.which("termux-battery-status") is not None


def auto_preset(has_battery: bool) -> str:
    """``auto``: phone on Android, laptop on another battery-powered machine, pi otherwise."""
    if on_android():
        return "phone"
    return "laptop" if has_battery else "pi"


_SETTINGS = Loader(Policy)  # the [policy] table's keys, types and conversions


def policy_from_mapping(data: Mapping[str, Any], *, has_battery: bool) -> tuple[Policy, str]:
    """A Policy from a TOML table (or env/flags merged into one): its preset with the given fields
    overriding it; returns it and the preset used (``auto`` resolved)."""
    values = dict(data)
    preset = str(values.pop("preset", "auto"))
    if preset == "auto":
        preset = auto_preset(has_battery)
    if preset not in PRESETS:
        raise PolicyError(f"policy preset {preset!r} is unknown (known: auto, {', '.join(PRESETS)})")
    known = {s.key for s in _SETTINGS.settings} - {"preset"}
    unknown = sorted(set(values) - known)
    if unknown:
        raise PolicyError(f"policy setting(s) {', '.join(unknown)} unknown (known: preset, {', '.join(sorted(known))})")
    try:
        changes = {key: _SETTINGS.convert(key, raw, "[policy]") for key, raw in values.items()}
    except SettingsError as exc:
        raise PolicyError(f"policy {exc}") from None
    return dataclasses.replace(PRESETS[preset], **changes), preset  # Policy checks itself (PolicyError)
