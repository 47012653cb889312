"""A full disk under the aggregator's store, for ``fedge simulate --fill-store-at`` (issue 19).

The fault fills the filesystem that holds the store with one file, written until the disk refuses
more (ENOSPC), so every write the aggregator makes from then on that needs a new block fails as
on a real full disk. Removing that file is "freeing space". It fills whatever filesystem the
store is on, so it refuses one larger than ``MAX_FILLABLE_BYTES``: the store must sit on a small
filesystem of its own (a tmpfs or a loop-mounted image of a few MiB; bench/chaos_soak mounts one).
"""

from __future__ import annotations

import contextlib
import errno
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

MAX_FILLABLE_BYTES = 1 << 30  # larger than this is someone's real disk, not a test's
FILLER_NAME = ".fedge-chaos-filler"
_FULL = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}


def check_fillable(folder: Path, max_bytes: int = MAX_FILLABLE_BYTES) -> None:
    """Refuse, with what to do, a folder whose filesystem is not small enough to fill on purpose."""
    stats = os.statvfs(folder)
    size = stats.f_blocks * stats.f_frsize
    if size > max_bytes:
        raise ValueError(
            f"--fill-store-at fills the filesystem of the store's folder {folder}, which holds {size / 2**30:.1f} GiB: give "
            f"--store a path on a small filesystem of its own (at most {max_bytes >> 20} MiB), e.g. as root "
            f"`mount -t tmpfs -o size=16m tmpfs DIR`"
        )


def fill(folder: Path, chunk: int = 1 << 16) -> tuple[Path, int]:
    """Write a file in ``folder`` until its filesystem is full; the file and the bytes it took.

    Big writes first, then single bytes, so no block is left that a small write could still use.
    """
    check_fillable(folder)
    filler = folder / FILLER_NAME
    written = 0
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        for size in (chunk, 4096, 1):
            block = b"\0" * size
            while True:
                try:
                    done = os.write(fd, block)
                except OSError as exc:
                    if exc.errno not in _FULL:
                        raise
                    break
                written += done
                if done < size:  # a short write: this size no longer fits
                    break
        try:
            os.fsync(fd)
        except OSError as exc:  # a filesystem that allocates at writeback may refuse only now: full either way
            if exc.errno not in _FULL:
                raise
    finally:
        os.close(fd)
    return filler, written


def free(filler: Path) -> None:
    """Free the space ``fill`` took."""
    filler.unlink(missing_ok=True)


class MountError(RuntimeError):
    """A small filesystem could not be mounted (not root, and not in a user+mount namespace)."""


@contextlib.contextmanager
def small_tmpfs(folder: Path, mib: int) -> Iterator[Path]:
    """A tmpfs of ``mib`` MiB mounted on ``folder`` for the block's time: as root, or in a user+mount
    namespace (``unshare -Urm``). Its files go with it when it is unmounted."""
    folder.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={mib}m,mode=0700", "tmpfs", str(folder)],
                             capture_output=True, text=True, check=False)
    if mounted.returncode != 0:
        raise MountError(f"cannot mount a {mib} MiB tmpfs on {folder}: {mounted.stderr.strip() or mounted.returncode}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "--lazy", str(folder)], capture_output=True, check=False)
