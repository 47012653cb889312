"""``make pi-check`` (``python -m bench.pi_arm64``): deploy/pi/install.sh and the agent on an arm64 userland.

Raspberry Pi OS 64-bit is Debian bookworm for arm64. This check builds that userland with
``debootstrap --arch=arm64`` (cached), runs ``deploy/pi/install.sh`` inside it the way a Pi user
would (a fresh copy every run: torch's aarch64 wheel and fedge from its index and this checkout),
checks float32 products in that torch, then trains: a Mosquitto and ``fedge aggregator`` on this
machine, one or two arm64 agents (their ``fedge agent`` from the installed venv). Every arm64
process is emulated by ``qemu-user-static`` as a Pi's own core (Cortex-A72, or A76 with --pi 5).
It prints JSON: install seconds, installed size, each agent's idle and training RSS, updates
accepted, each model's accuracy and loss, warnings, errors.

What it needs (it prints ``{"skipped": reason}`` and exits 0 without any of them): Linux, root
(chroot, mounts), the Debian packages ``debootstrap`` and ``qemu-user-static`` (binfmt_misc
mounted or mountable, the qemu-aarch64 handler registered with its F flag), ``mosquitto``, and the
network to reach Debian's mirror and PyPI. It is slow (minutes), so it is not part of the test suite.

Modules: ``prereqs`` (what is missing and how to get it), ``userland`` (building, copying and
entering the arm64 tree), ``emulation`` (what only emulation needs, kept out of the product),
``sizes`` (installed size from the venv's RECORD files), ``check`` (the run and its JSON).
"""
