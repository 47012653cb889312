"""The agent's on-disk outbox: one atomically written file per update until its receipt."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from edge_agent.outbox import Outbox, PendingUpdate


@pytest.fixture
def box(tmp_path: Path) -> Outbox:
    return Outbox(tmp_path / "state" / "outbox")


def ids(box: Outbox) -> list[str]:
    return [p.update_id for p in box.pending()]


def test_creates_its_directory(tmp_path: Path) -> None:
    Outbox(tmp_path / "a" / "b")
    assert (tmp_path / "a" / "b").is_dir()


def test_put_names_the_file_and_keeps_the_payload(box: Outbox) -> None:
    pending = box.put(update_id="abc123", round_no=3, base_version=2, payload=b"\x00payload\xff")
    assert pending == PendingUpdate("abc123", 3, 2, box.directory / "r3-v2-abc123.update")
    assert pending.path.read_bytes() == b"\x00payload\xff"
    assert pending.payload() == b"\x00payload\xff"
    assert sorted(os.listdir(box.directory)) == ["r3-v2-abc123.update"]  # no temp file left behind


def test_pending_lists_oldest_round_first(box: Outbox) -> None:
    box.put(update_id="late", round_no=10, base_version=9, payload=b"c")
    box.put(update_id="early", round_no=2, base_version=1, payload=b"a")
    box.put(update_id="with-dash_and_underscore", round_no=5, base_version=4, payload=b"b")
    pending = box.pending()
    assert [(p.update_id, p.round, p.base_version) for p in pending] == [
        ("early", 2, 1), ("with-dash_and_underscore", 5, 4), ("late", 10, 9),
    ]
    assert [p.payload() for p in pending] == [b"a", b"b", b"c"]


def test_pending_ignores_foreign_and_temporary_files(box: Outbox) -> None:
    box.put(update_id="u1", round_no=1, base_version=0, payload=b"x")
    for name in ["notes.txt", ".r1-v0-u2.update.abc.tmp", "r1-v0-u3.update.bak", "rX-v0-u4.update", "r1-u5.update"]:
        (box.directory / name).write_bytes(b"junk")
    assert ids(box) == ["u1"]


def test_remove(box: Outbox) -> None:
    box.put(update_id="u1", round_no=1, base_version=0, payload=b"x")
    box.put(update_id="u2", round_no=1, base_version=0, payload=b"y")
    assert box.remove("u1") is True
    assert ids(box) == ["u2"]
    assert box.remove("u1") is False  # already gone
    assert box.remove("never") is False
    assert ids(box) == ["u2"]


def test_drop_before(box: Outbox) -> None:
    for round_no, update_id in [(1, "a"), (2, "b"), (3, "c"), (4, "d")]:
        box.put(update_id=update_id, round_no=round_no, base_version=round_no - 1, payload=b"p")
    assert sorted(box.drop_before(3)) == ["a", "b"]
    assert ids(box) == ["c", "d"]
    assert box.drop_before(3) == []
    assert box.drop_before(0) == []
    assert ids(box) == ["c", "d"]


def test_put_same_update_twice_overwrites(box: Outbox) -> None:
    box.put(update_id="u1", round_no=1, base_version=0, payload=b"old")
    box.put(update_id="u1", round_no=1, base_version=0, payload=b"new")
    (pending,) = box.pending()
    assert pending.payload() == b"new"


def test_survives_reinstantiation(tmp_path: Path) -> None:
    directory = tmp_path / "outbox"
    first = Outbox(directory)
    first.put(update_id="u1", round_no=4, base_version=3, payload=b"trained before the reboot")
    first.put(update_id="u2", round_no=5, base_version=4, payload=b"and this")
    first.remove("u2")
    again = Outbox(directory)
    (pending,) = again.pending()
    assert (pending.update_id, pending.round, pending.base_version) == ("u1", 4, 3)
    assert pending.payload() == b"trained before the reboot"


def test_put_refuses_or_lists_every_update_id(box: Outbox) -> None:
    try:
        box.put(update_id="v1.2", round_no=1, base_version=0, payload=b"x")
    except ValueError:
        return  # refusing an id the outbox cannot list is fine too
    assert ids(box) == ["v1.2"]
