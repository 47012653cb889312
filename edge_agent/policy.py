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
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, time
from typing import Any

from edge_agent.probes import DeviceSnapshot


class PolicyError(ValueError):
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


@dataclass(frozen=True)
class Policy:
    require_charging: bool = True  # a device without a battery counts as charging (mains)
    min_battery: float = 0.0  # percent; only checked on devices with a battery
    max_cpu_load: float | None = 0.5  # fraction of all cores other programs may use (None: ignore)
    load_window: float = 60.0  # seconds the CPU load is averaged over ("idle for a while")
    max_temperature_c: float | None = 75.0  # hottest thermal zone (None: ignore)
    windows: tuple[TimeWindow, ...] = ()  # empty: any time of day
    require_unmetered: bool = False  # only where detectable: an unknown network never blocks

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
        if self.require_charging and not power.plugged:
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
    "phone": Policy(require_charging=True, min_battery=20.0, max_cpu_load=0.25, max_temperature_c=45.0, require_unmetered=True),
    # plugged in and idle; laptop SoCs run warm, so only the throttling zone counts
    "laptop": Policy(require_charging=True, min_battery=50.0, max_cpu_load=0.3, max_temperature_c=90.0),
    # mains powered: idle and cool (a Pi throttles near 80-85 C)
    "pi": Policy(require_charging=False, max_cpu_load=0.5, max_temperature_c=70.0),
    # servers and simulations: whenever there is work
    "always": Policy(require_charging=False, max_cpu_load=None, max_temperature_c=None),
}


def on_android() -> bool:
    return "ANDROID_ROOT" in os.environ or shutil.which("termux-battery-status") is not None


def auto_preset(has_battery: bool) -> str:
    """``auto``: phone on Android, laptop on another battery-powered machine, pi otherwise."""
    if on_android():
        return "phone"
    return "laptop" if has_battery else "pi"


_FIELDS = {f.name for f in dataclasses.fields(Policy)}


def policy_from_mapping(data: Mapping[str, Any], *, has_battery: bool) -> tuple[Policy, str]:
    """A Policy from a TOML table (or env/flags merged into one); returns it and the preset used."""
    values = dict(data)
    preset = str(values.pop("preset", "auto"))
    if preset == "auto":
        preset = auto_preset(has_battery)
    if preset not in PRESETS:
        raise PolicyError(f"policy preset {preset!r} is unknown (known: auto, {', '.join(PRESETS)})")
    unknown = sorted(set(values) - _FIELDS)
    if unknown:
        raise PolicyError(f"policy setting(s) {', '.join(unknown)} unknown (known: preset, {', '.join(sorted(_FIELDS))})")
    changes: dict[str, Any] = {}
    for key, raw in values.items():
        changes[key] = _coerce(key, raw)
    return dataclasses.replace(PRESETS[preset], **changes), preset


def _coerce(key: str, raw: Any) -> Any:
    """TOML gives typed values; environment variables and flags give strings."""
    if key == "windows":
        items = raw.split(",") if isinstance(raw, str) else raw
        if not isinstance(items, (list, tuple)):
            raise PolicyError("policy windows must be a list like ['22:00-07:00']")
        return tuple(TimeWindow.parse(str(item)) for item in items if str(item).strip())
    if key in ("require_charging", "require_unmetered"):
        if isinstance(raw, bool):
            return raw
        text = str(raw).strip().lower()
        if text in ("1", "true", "yes", "on"):
            return True
        if text in ("0", "false", "no", "off"):
            return False
        raise PolicyError(f"policy {key} must be true or false, got {raw!r}")
    if key in ("max_cpu_load", "max_temperature_c") and (raw is None or str(raw).strip().lower() in ("none", "off", "")):
        return None
    try:
        return float(raw)
    except (TypeError, ValueError):
        raise PolicyError(f"policy {key} must be a number, got {raw!r}") from None
