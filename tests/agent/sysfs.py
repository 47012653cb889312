"""Fake /sys trees made of real files, shaped like a laptop, a phone, a Pi; and a process that is gone."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import psutil


def supply(root: Path, name: str, **files: str) -> Path:
    folder = root / "class" / "power_supply" / name
    folder.mkdir(parents=True, exist_ok=True)
    for key, value in files.items():
        (folder / key).write_text(value + "\n")
    return folder


def thermal(root: Path, zone: int, millidegrees: int) -> None:
    folder = root / "class" / "thermal" / f"thermal_zone{zone}"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "temp").write_text(f"{millidegrees}\n")


def battery_device(root: Path, status: str, capacity: int, *, mains_online: bool | None = None, temp_mc: int = 40000) -> Path:
    supply(root, "BAT0", type="Battery", status=status, capacity=str(capacity))
    if mains_online is not None:
        supply(root, "AC", type="Mains", online="1" if mains_online else "0")
    thermal(root, 0, temp_mc)
    return root


def gone_process() -> psutil.Process:
    """A psutil handle on a process that has exited and been reaped: a real NoSuchProcess on every call."""
    child = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    handle = psutil.Process(child.pid)
    child.communicate(timeout=30)
    return handle
