"""What only emulation needs: kept in the check, never in the product.

First, the CPU qemu-user emulates. Its default model (``max``) has every feature qemu knows,
SVE with 512-bit vectors among them; torch 2.13.0's aarch64 wheel then computes float32 matrix
products wrong (a 4x64 by 64x8 product off by up to 0.7, against 1e-7 natively), so the agents
trained and every update was accepted, yet the model fell apart (eval loss 4.6, 80, 8354 over
three rounds; accuracy 0.21). With 128- or 256-bit SVE, or none, the products are right. No
Raspberry Pi has SVE: the check runs every arm64 process as the Pi's own core
(``QEMU_CPU=cortex-a72`` for a Pi 4, ``cortex-a76`` for a Pi 5, ``--pi``), which is also the
feature set torch must cope with on the device, and checks float32 products in the tree
(``FLOAT32_PROBE``) before it trains, with one thread (the agent's ``torch_threads``) and with all.

That emulated Pi core found what a Pi 4 would meet: PyPI's aarch64 torch 2.13.0 (the CUDA build,
all this machine can reach) multiplies through NVIDIA's NVPL BLAS, whose threaded path uses
Armv8.1 atomics (``ldaddal``). A Cortex-A72 (Pi 4) or A53 (Pi 3) has none: torch dies of SIGILL
as soon as a product runs on two threads. One thread works; a Pi 5's A76 is fine either way.

Second, on a Raspberry Pi the kernel exposes each core's ID registers in sysfs. Under ``qemu-user`` on an
x86 host, ``/sys`` is the host's, and has no ``cpuN/regs/identification/midr_el1``: torch's CPU
feature detection (the cpuinfo library under oneDNN) then dereferences what it failed to read, and
the training child dies of SIGSEGV at its first convolution/matmul set-up. The check mounts, over
``/sys/devices/system/cpu`` inside the arm64 tree only, a small tree with the registers a Pi 4
reports (Cortex-A72 r0p3), so torch takes the path it takes on the device.

Third, qemu-user answers ``/proc/self/stat`` (and ``/proc/<own pid>/stat``) itself, and gives as
the process's start time the start time of the *calling thread*. psutil identifies a process by
that start time, so a ``psutil.Process()`` made on one thread and used on another looks like a
reused PID, and ``children()`` raises ``NoSuchProcess``. The agent's CPU meter samples on executor
threads: before 62188d5 that ended the agent at its first sample, and until the meter took a fresh
handle on its own process each sample (``edge_agent/probes.py``) it left the CPU load unknown.
The current agent needs nothing here. ``PSUTIL_SHIM`` (``--psutil-shim``) remains for measuring an
earlier revision with ``--source``: a ``sitecustomize`` on the arm64 agents' ``PYTHONPATH`` only,
which turns psutil's PID-reuse check off there.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

CORTEX_A72_R0P3 = "0x00000000410fd083"  # MIDR_EL1 of a Raspberry Pi 4's cores (implementer 0x41 Arm, part 0xd08)
CORTEX_A76_R4P1 = "0x00000000414fd0b1"  # a Raspberry Pi 5's (BCM2712: part 0xd0b, variant 4, revision 1)


@dataclass(frozen=True)
class PiCpu:
    """The core a Raspberry Pi model has: what qemu emulates (its features) and what sysfs reports (its registers)."""

    board: str
    qemu_cpu: str  # qemu-user's -cpu model, given as QEMU_CPU to every process in the tree
    midr: str

    def env(self) -> dict[str, str]:
        return {"QEMU_CPU": self.qemu_cpu}


PI_CPUS = {
    "4": PiCpu("Raspberry Pi 4 (Cortex-A72)", "cortex-a72", CORTEX_A72_R0P3),
    "5": PiCpu("Raspberry Pi 5 (Cortex-A76)", "cortex-a76", CORTEX_A76_R4P1),
}

# Run in the tree's venv after install (argument: torch's thread count): float32 matrix products
# against float64, as nn.Linear computes them, the digits model's shapes among them.
FLOAT32_PROBE = """\
import sys
import torch
torch.set_num_threads(int(sys.argv[1]))
g = torch.Generator().manual_seed(0)
worst = 0.0
for rows, inner, cols in ((4, 64, 8), (16, 64, 128), (16, 128, 10)):
    x, w, b = torch.randn(rows, inner, generator=g), torch.randn(cols, inner, generator=g), torch.randn(cols, generator=g)
    exact = torch.nn.functional.linear(x.double(), w.double(), b.double())
    worst = max(worst, float((torch.nn.functional.linear(x, w, b).double() - exact).abs().max()))
print(worst)
"""
FLOAT32_TOLERANCE = 1e-3  # natively ~1e-5 for these sizes; the SVE-512 failure was 0.25-0.77


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
