"""What the arm64 check needs from this machine, and the one thing to do about each gap.

``missing()`` returns reasons, empty when everything is there; the check skips (exit 0, JSON
``skipped``) with them rather than failing, because a machine without root or network is a
normal place to run the test suite, not a broken one.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Callable, Iterable
from pathlib import Path

BINFMT = Path("/proc/sys/fs/binfmt_misc")
QEMU_HANDLER = "qemu-aarch64"
# (what, host, port): Debian's mirror for debootstrap and apt-get, PyPI for torch and the rest
TORCH_CPU_INDEX = ("download.pytorch.org", 443)  # install.sh's default --torch-index; the check falls back to PyPI without it
ENDPOINTS = (("Debian's mirror", "deb.debian.org", 80), ("PyPI", "pypi.org", 443), ("PyPI's files", "files.pythonhosted.org", 443))
TOOLS = {  # program -> the Debian package that brings it
    "debootstrap": "debootstrap",
    "qemu-aarch64-static": "qemu-user-static",
    "unshare": "util-linux",
    "chroot": "coreutils",
}


def reachable(host: str, port: int, timeout: float = 5.0) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def handler_state(binfmt: Path = BINFMT, name: str = QEMU_HANDLER) -> str | None:
    """Why the kernel would not run an arm64 binary through qemu, or None when it would.

    The handler needs the F ("fix binary") flag: the kernel then opens qemu when the handler is
    registered, so binaries inside a chroot run without a copy of qemu in the chroot.
    """
    if not (binfmt / "status").exists():
        return "binfmt_misc is not mounted"
    entry = binfmt / name
    if not entry.exists():
        return f"no {name} binfmt handler is registered (Debian's qemu-user-static and binfmt-support register it)"
    lines = entry.read_text().splitlines()
    if "enabled" not in lines:
        return f"the {name} binfmt handler is disabled: update-binfmts --enable {name}"
    flags = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("flags:")), "")
    if "F" not in flags:
        return f"the {name} binfmt handler lacks the F flag (flags: {flags or 'none'}): binaries in a chroot would not find qemu"
    return None


def enable_binfmt(binfmt: Path = BINFMT, run: Callable[..., object] = subprocess.run) -> None:
    """Mount binfmt_misc and enable qemu's handler when we can (root); failures show in ``handler_state``."""
    if not (binfmt / "status").exists():
        run(["mount", "-t", "binfmt_misc", "binfmt_misc", str(binfmt)], check=False, capture_output=True)
    if not (binfmt / QEMU_HANDLER).exists() and shutil.which("update-binfmts"):
        run(["update-binfmts", "--enable", QEMU_HANDLER], check=False, capture_output=True)


def missing_tools(which: Callable[[str], str | None] = shutil.which, tools: dict[str, str] = TOOLS) -> list[str]:
    packages = sorted({package for program, package in tools.items() if which(program) is None})
    return [f"missing Debian package(s): apt-get install {' '.join(packages)}"] if packages else []


def missing(
    *,
    is_root: bool | None = None,
    platform: str = sys.platform,
    which: Callable[[str], str | None] = shutil.which,
    has_mosquitto: Callable[[], bool] | None = None,
    is_reachable: Callable[[str, int], bool] = reachable,
    endpoints: Iterable[tuple[str, str, int]] = ENDPOINTS,
    binfmt: Callable[[], str | None] = handler_state,
) -> list[str]:
    """Every reason the check cannot run here (empty: it can). Parameters are for tests."""
    if platform != "linux":
        return [f"needs Linux (chroot, binfmt_misc), this is {platform}"]
    if is_root is None:
        is_root = os.geteuid() == 0
    if not is_root:
        return ["needs root: it runs debootstrap, mounts /proc and /sys into the arm64 tree and chroots into it (sudo make pi-check)"]
    reasons = missing_tools(which)
    if has_mosquitto is None:
        has_mosquitto = _has_mosquitto
    if not has_mosquitto():
        reasons.append("mosquitto is not installed: apt-get install mosquitto")
    if not reasons:
        problem = binfmt()
        if problem:
            reasons.append(problem)
    for what, host, port in endpoints:
        if not is_reachable(host, port):
            reasons.append(f"no network to {what} ({host}:{port}): debootstrap, apt-get and pip need it")
    return reasons


def _has_mosquitto() -> bool:
    from broker import BrokerNotFound, find_mosquitto

    try:
        find_mosquitto()
    except BrokerNotFound:
        return False
    return True

NEEDS = [
    "Linux and root (debootstrap, chroot, mounts in a private mount namespace)",
    "Debian packages: debootstrap, qemu-user-static (binfmt-support registers its handler), mosquitto",
    "binfmt_misc mounted (the check mounts it when it can) with qemu-aarch64 registered, flag F",
    "network: Debian's mirror (the arm64 tree, python3-venv) and PyPI (torch's aarch64 wheel, fedge's dependencies)",
]
