"""What only emulation needs: kept in the check, never in the product.

On a Raspberry Pi the kernel exposes each core's ID registers in sysfs. Under ``qemu-user`` on an
x86 host, ``/sys`` is the host's, and has no ``cpuN/regs/identification/midr_el1``: torch's CPU
feature detection (the cpuinfo library under oneDNN) then dereferences what it failed to read, and
the training child dies of SIGSEGV at its first convolution/matmul set-up. The check mounts, over
``/sys/devices/system/cpu`` inside the arm64 tree only, a small tree with the registers a Pi 4
reports (Cortex-A72 r0p3), so torch takes the path it takes on the device.

Second, qemu-user answers ``/proc/self/stat`` (and ``/proc/<own pid>/stat``) itself, and gives as
the process's start time the start time of the *calling thread*. psutil identifies a process by
that start time, so a ``psutil.Process()`` made on one thread and used on another (the agent's CPU
meter samples in a worker thread) looks like a reused PID, and ``children()`` raises
``NoSuchProcess``: the agent dies at its first CPU sample. ``PSUTIL_SHIM`` is a ``sitecustomize``
the check puts on the arm64 agents' ``PYTHONPATH`` only; it turns psutil's PID-reuse check off
there. (The agent should survive a child vanishing mid-walk anyway: that fix belongs to
``edge_agent/probes.py``, which this check leaves alone.)
"""

from __future__ import annotations

from pathlib import Path

CORTEX_A72_R0P3 = "0x00000000410fd083"  # MIDR_EL1 of a Raspberry Pi 4's cores (implementer 0x41 Arm, part 0xd08)


def fake_cpu_tree(dest: Path, cores: int, midr: str = CORTEX_A72_R0P3) -> Path:
    """Write ``dest`` as the ``/sys/devices/system/cpu`` of a ``cores``-core Pi; returns ``dest``."""
    if cores < 1:
        raise ValueError(f"cores must be >= 1, got {cores}")
    span = "0" if cores == 1 else f"0-{cores - 1}"
    dest.mkdir(parents=True, exist_ok=True)
    for name in ("possible", "present", "online"):
        (dest / name).write_text(span + "\n")
    for core in range(cores):
        registers = dest / f"cpu{core}" / "regs" / "identification"
        registers.mkdir(parents=True, exist_ok=True)
        (registers / "midr_el1").write_text(midr + "\n")
        (registers / "revidr_el1").write_text("0x0000000000000000\n")
        (dest / f"cpu{core}" / "online").write_text("1\n")
    return dest


PSUTIL_SHIM = """\
# Written by bench/pi_arm64 (emulation only): qemu-user reports a thread's start time as the
# process's in /proc/self/stat, so psutil's PID-reuse check misfires across threads.
try:
    import psutil
except ImportError:
    pass
else:
    psutil.Process._raise_if_pid_reused = lambda self: None
"""


def write_psutil_shim(dest: Path) -> Path:
    """A folder holding ``sitecustomize.py`` with ``PSUTIL_SHIM``: put it on PYTHONPATH."""
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "sitecustomize.py").write_text(PSUTIL_SHIM)
    return dest
