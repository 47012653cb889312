"""atomic_write: the old file or the new one, never half of one, and no temp files left."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from edge_agent.files import atomic_write


def test_writes_and_replaces(tmp_path: Path) -> None:
    path = tmp_path / "data.bin"
    atomic_write(path, b"first")
    assert path.read_bytes() == b"first"
    atomic_write(path, b"\x00" * 10_000)
    assert path.read_bytes() == b"\x00" * 10_000
    atomic_write(path, b"")
    assert path.read_bytes() == b""
    assert os.listdir(tmp_path) == ["data.bin"]


def test_many_writes_leave_no_temp_files(tmp_path: Path) -> None:
    for i in range(20):
        atomic_write(tmp_path / f"f{i % 3}", str(i).encode())
    assert sorted(os.listdir(tmp_path)) == ["f0", "f1", "f2"]
    assert (tmp_path / "f0").read_bytes() == b"18"


def test_failed_replace_cleans_up_and_keeps_the_target(tmp_path: Path) -> None:
    target = tmp_path / "taken"
    target.mkdir()
    (target / "inside").write_bytes(b"keep me")  # a non-empty directory cannot be replaced by a file
    with pytest.raises(OSError):
        atomic_write(target, b"new")
    assert sorted(os.listdir(tmp_path)) == ["taken"]
    assert (target / "inside").read_bytes() == b"keep me"


def test_missing_parent_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        atomic_write(tmp_path / "nope" / "file", b"x")
    assert os.listdir(tmp_path) == []
