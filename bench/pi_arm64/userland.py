"""The arm64 Debian bookworm tree (Raspberry Pi OS 64-bit's base): built once, copied fresh per run, entered.

``ensure_base`` runs ``debootstrap --arch=arm64`` into the cache and marks the tree complete with
the recipe it was built from, so a second run reuses it and a changed recipe rebuilds it. Each run
works in a copy (``fresh_copy``): install.sh always meets a machine it has never seen.

``enter_command`` is the host command that runs a program inside the tree: a private mount
namespace (``unshare --mount``) whose mounts vanish with the process, however it ends (nothing to
unmount, nothing left behind by a killed check), then ``chroot``. The network is the host's, so an
agent inside reaches the broker on 127.0.0.1. The environment is emptied to what a login gives.
"""

from __future__ import annotations

import shlex
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

SUITE = "bookworm"
MIRROR = "http://deb.debian.org/debian"
# python3 without python3-venv, as on a minimal Pi OS image: install.sh's apt-get step then runs too
PACKAGES = ("python3", "ca-certificates")
STAMP = ".fedge-pi-check"
LOGIN_ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "HOME": "/root",
    "LANG": "C.UTF-8",
    "TERM": "dumb",
}


class UserlandError(RuntimeError):
    """Building or copying the arm64 tree failed; the message carries the tool's last lines."""


def debootstrap_argv(target: Path, *, suite: str = SUITE, mirror: str = MIRROR, packages: Sequence[str] = PACKAGES) -> list[str]:
    return ["debootstrap", "--arch=arm64", "--variant=minbase", f"--include={','.join(packages)}", suite, str(target), mirror]


def recipe(suite: str = SUITE, mirror: str = MIRROR, packages: Sequence[str] = PACKAGES) -> str:
    return " ".join(debootstrap_argv(Path("TARGET"), suite=suite, mirror=mirror, packages=packages))


def ensure_base(cache: Path, log: Path) -> tuple[Path, bool]:
    """The cached pristine tree, built when missing or stale; (its path, whether it was built now)."""
    base = cache / f"rootfs-{SUITE}-arm64"
    stamp = base / STAMP
    if stamp.exists() and stamp.read_text() == recipe():
        return base, False
    partial = cache / f"{base.name}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    cache.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as out:
        done = subprocess.run(debootstrap_argv(partial), stdout=out, stderr=subprocess.STDOUT, check=False)
    if done.returncode != 0:
        raise UserlandError(f"debootstrap failed ({done.returncode}): {tail(log)}")
    for deb in (partial / "var" / "cache" / "apt" / "archives").glob("*.deb"):
        deb.unlink()  # the tree is copied every run: keep it small
    (partial / STAMP).write_text(recipe())
    shutil.rmtree(base, ignore_errors=True)
    partial.rename(base)
    return base, True


def fresh_copy(base: Path, dest: Path) -> Path:
    """A copy of the pristine tree at ``dest`` (replacing an earlier run's), with this host's DNS."""
    if dest.exists():
        subprocess.run(["rm", "-rf", "--one-file-system", str(dest)], check=True)
    dest.parent.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["cp", "-a", "--reflink=auto", str(base), str(dest)], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise UserlandError(f"copying {base} to {dest} failed: {done.stderr.strip()}")
    shutil.copyfile("/etc/resolv.conf", dest / "etc" / "resolv.conf")
    return dest


def copy_checkout(repo: Path, dest: Path, revision: str | None = None) -> Path:
    """What a user's clone would hold: the files git tracks in ``repo`` as the working tree has them
    (uncommitted edits included), or as commit ``revision`` had them (to measure an earlier version)."""
    dest.mkdir(parents=True, exist_ok=True)
    if revision is not None:
        archive = subprocess.run(["git", "-C", str(repo), "archive", "--format=tar", revision], capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
        return dest
    listed = subprocess.run(["git", "-C", str(repo), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                            capture_output=True, check=True).stdout
    for name in filter(None, listed.decode().split("\0")):
        source = repo / name
        if source.is_file():
            target = dest / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)
    return dest


@dataclass(frozen=True)
class Mount:
    """One mount inside the tree: ``source`` is a host path (a bind) or a filesystem type (``fstype``)."""

    target: str  # path inside the tree
    source: str
    fstype: str | None = None  # None: a bind mount of the host path ``source``
    options: str | None = None

    def command(self, root: Path) -> str:
        where = shlex.quote(str(root) + self.target)
        options = f" -o {shlex.quote(self.options)}" if self.options else ""
        if self.fstype is None:
            return f"mkdir -p {where} && mount --bind{options} {shlex.quote(self.source)} {where}"
        return f"mount -t {self.fstype}{options} {shlex.quote(self.source)} {where}"


def standard_mounts() -> list[Mount]:
    """What a booted Pi has that a chroot lacks: /proc (psutil, the agent's probes), /sys read-only, /dev/shm,
    and /dev/pts (a private instance: apt-get writes its log through a pseudo-terminal and says "E:" without one)."""
    return [
        Mount("/proc", "proc", "proc"),
        Mount("/sys", "sysfs", "sysfs", "ro"),
        Mount("/dev/shm", "tmpfs", "tmpfs", "mode=1777"),
        Mount("/dev/pts", "devpts", "devpts", "newinstance,ptmxmode=0666,mode=0620"),
    ]


def enter_command(root: Path, argv: Sequence[str], *, mounts: Sequence[Mount], env: Mapping[str, str] | None = None,
                  cwd: str = "/") -> list[str]:
    """The host argv that runs ``argv`` inside ``root`` with ``mounts``, in a mount namespace of its own.

    ``unshare`` without ``--fork`` execs in place, as do ``sh`` and ``chroot``: the process id the
    caller gets is the arm64 program's own (its RSS and children are then measurable from here).
    """
    environment = {**LOGIN_ENV, **(env or {})}
    setup = " && ".join(m.command(root) for m in mounts) or "true"
    inner = ["/usr/bin/env", "-i", *(f"{k}={v}" for k, v in environment.items()), "/bin/sh", "-c", f'cd {shlex.quote(cwd)} && exec "$@"', "sh",
             *argv]
    script = f'set -e; {setup}; exec chroot {shlex.quote(str(root))} "$@"'
    return ["unshare", "--mount", "--propagation", "private", "--", "/bin/sh", "-c", script, "sh", *inner]


def tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""
