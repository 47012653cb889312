"""The full-disk fault of ``fedge simulate --fill-store-at``: it fills only a small filesystem, and
fills it for real (a tmpfs mounted for the test: root, or a user+mount namespace)."""

from __future__ import annotations

import errno
from collections.abc import Iterator
from pathlib import Path

import pytest

from fedge.simulate import disk_full


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    try:
        with disk_full.small_tmpfs(tmp_path / "disk", 2) as folder:
            yield folder
    except disk_full.MountError as exc:
        pytest.skip(f"needs root (or unshare -Urm) to mount a tmpfs: {exc}")


def test_a_filesystem_larger_than_the_limit_is_refused_with_what_to_do(tmp_path):
    with pytest.raises(ValueError, match=r"--fill-store-at fills the filesystem.*--store.*tmpfs"):
        disk_full.check_fillable(tmp_path, max_bytes=4096)


def test_fill_leaves_no_byte_free_and_free_gives_the_space_back(small_disk):
    (small_disk / "store.sqlite").write_bytes(b"x" * 1000)
    filler, written = disk_full.fill(small_disk)
    assert written > 1 << 20  # most of the 2 MiB
    with pytest.raises(OSError) as refused:
        (small_disk / "more").write_bytes(b"y" * 4096)
    assert refused.value.errno == errno.ENOSPC
    disk_full.free(filler)
    assert not filler.exists()
    (small_disk / "more").write_bytes(b"y" * 4096)  # room again
