"""``make pi-check`` (``python -m bench.pi_arm64``): deploy/pi/install.sh and the agent on an arm64 userland.

Raspberry Pi OS 64-bit is Debian bookworm for arm64. This check builds that userland with
``debootstrap --arch=arm64`` (cached), runs ``deploy/pi/install.sh`` inside it the way a Pi user
would (a fresh copy every run: torch's aarch64 wheel and fedge from PyPI and this checkout),
then trains: a Mosquitto and an aggregator on this machine, one or two arm64 agents (their
``fedge agent`` from the installed venv, emulated by ``qemu-user-static``). It prints JSON: install
seconds, installed size, each agent's idle and training RSS, updates accepted, errors.

What it needs (it prints ``{"skipped": reason}`` and exits 0 without any of them): Linux, root
(chroot, mounts), the Debian packages ``debootstrap`` and ``qemu-user-static`` (binfmt_misc
mounted or mountable, the qemu-aarch64 handler registered with its F flag), ``mosquitto``, and the
network to reach Debian's mirror and PyPI. It is slow (minutes), so it is not part of the test suite.

Modules: ``prereqs`` (what is missing and how to get it), ``userland`` (building, copying and
entering the arm64 tree), ``emulation`` (what only emulation needs, kept out of the product),
``sizes`` (installed size from the venv's RECORD files), ``check`` (the run and its JSON).
"""
