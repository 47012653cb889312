"""The store's spool: payloads in append-only segment files, deferred durability, sync() order, release, recovery.

Real SQLite databases and real files in tmp_path; two Store instances on one file stand for two
worker processes. What a power cut leaves (bytes missing, short or torn behind a committed row)
is made by editing the segment files directly.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import sqlite3
import stat
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from aggregator.store import ReceiptRow, SpooledUpdate, Standing, Store, digest

W = {"w": np.array([1.0, 2.0], np.float32)}


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "state" / "agg.sqlite"


def payload(seed: int, size: int = 4096) -> bytes:
    return np.random.default_rng(seed).bytes(size)


def spool(store: Store, update_id: str, client: str, data: bytes, *, round_no: int = 1, shard: int | None = None) -> None:
    store.spool(update_id=update_id, client_id=client, round_no=round_no, base_version=0, num_samples=10, payload=data,
                shard=shard)


def admit(store: Store, update_id: str, client: str, data: bytes, check: Callable[[Standing], None] = lambda s: None,
          **kw: Any) -> None:
    store.admit(update_id=update_id, client_id=client, round_no=1, base_version=0, num_samples=10, payload=data, check=check,
                **kw)


def segments(path: Path, pattern: str = "*.seg") -> list[str]:
    folder = path.with_name(path.name + ".spool")
    return sorted(p.name for p in folder.glob(pattern)) if folder.is_dir() else []


def row(path: Path, update_id: str) -> tuple[str, int, int]:
    with sqlite3.connect(path) as db:
        return db.execute('SELECT segment, "offset", bytes FROM accepted WHERE update_id=?', (update_id,)).fetchone()


# ---------------------------------------------------------------- round trip
def test_spooled_returns_the_exact_bytes_in_arrival_order_and_by_shard(path: Path) -> None:
    sizes = {"u1": 96 * 1024, "u2": 0, "u3": 1, "u4": 300_001, "u5": 4096}
    shards = {"u1": 0, "u2": 1, "u3": None, "u4": 0, "u5": 1}
    with Store(path) as store:
        store.open_round(1, 0, None)
        for i, (uid, size) in enumerate(sizes.items()):
            spool(store, uid, f"c{i}", payload(i, size), shard=shards[uid])
        spool(store, "u9", "c9", payload(9), round_no=2)
        expected = [SpooledUpdate(uid, f"c{i}", 10, payload(i, size)) for i, (uid, size) in enumerate(sizes.items())]
        assert store.spooled(1) == expected
        assert store.spooled(1, shard=0) == [u for u in expected if shards[u.update_id] == 0]
        assert store.spooled(1, shard=1) == [u for u in expected if shards[u.update_id] == 1]
        assert store.spooled(2) == [SpooledUpdate("u9", "c9", 10, payload(9))]
        with sqlite3.connect(path) as db:  # the payload column stays empty; bytes, digest and offsets are right
            for uid, segment, _offset, nbytes, blob, dig in db.execute(
                'SELECT update_id, segment, "offset", bytes, payload, digest FROM accepted WHERE round=1'
            ):
                i = list(sizes).index(uid)
                assert blob is None and nbytes == sizes[uid] and dig == digest(payload(i, sizes[uid]))
                shard = shards[uid]
                assert re.fullmatch(rf"r1-{'a' if shard is None else shard}-[0-9a-f]+\.seg", segment)
        # one segment per (round, shard) of this instance, appended back to back
        assert len(segments(path)) == 4
        assert row(path, "u4")[1] == sizes["u1"]
    with Store(path) as reopened:  # and after reopening
        assert reopened.spooled(1) == expected


def test_the_spool_folder_is_private_and_made_on_first_write(path: Path) -> None:
    with Store(path) as store:
        folder = path.with_name("agg.sqlite.spool")
        assert not folder.exists()
        store.open_round(1, 0, None)
        store.record_receipts([ReceiptRow(time.time(), 1, "c", None, "rejected", "x", 1)])
        store.sync()
        assert not folder.exists()
        spool(store, "u1", "c1", b"x")
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700
        assert stat.S_IMODE((folder / segments(path)[0]).stat().st_mode) == 0o600


def test_two_instances_write_their_own_segments_and_share_the_ledger(path: Path) -> None:
    """Like two worker processes: same round and shard, one file each; either sees both; admit's check sees the other's rows."""
    with Store(path) as w0, Store(path) as w1:
        w0.open_round(1, 0, None)
        admit(w0, "u1", "a", payload(1), shard=0)
        admit(w1, "u2", "b", payload(2), shard=0)
        admit(w0, "u3", "c", payload(3), shard=0)
        files = segments(path)
        assert len(files) == 2 and all(name.startswith("r1-0-") for name in files)
        assert {row(path, "u1")[0], row(path, "u3")[0]} == {row(path, "u1")[0]} != {row(path, "u2")[0]}
        assert row(path, "u3")[1] == 4096 and row(path, "u2")[1] == 0  # each writer's own offsets
        expected = [SpooledUpdate(f"u{i}", client, 10, payload(i)) for i, client in ((1, "a"), (2, "b"), (3, "c"))]
        assert w0.spooled(1) == w1.spooled(1) == expected

        seen: list[Standing] = []
        admit(w1, "u4", "d", payload(4), check=seen.append)
        assert seen[-1] == Standing(update_seen=False, client_seen=False, accepted=3, closing=False)

        def refuse(standing: Standing) -> None:
            seen.append(standing)
            raise LookupError("refused")

        with pytest.raises(LookupError):
            admit(w1, "u1", "a", payload(9), check=refuse)  # w0's committed row: a duplicate, seen by w1
        assert seen[-1].update_seen and seen[-1].client_seen and seen[-1].accepted == 4
        admit(w1, "u5", "e", payload(5))  # the refused bytes were overwritten: no gap, no row for them
        assert row(path, "u5")[1] == row(path, "u4")[1] + 4096
        assert [u.payload for u in w0.spooled(1)] == [payload(i) for i in (1, 2, 3, 4, 5)]
        with pytest.raises(sqlite3.IntegrityError):
            spool(w0, "u2", "b", payload(2))  # the primary key still dedupes across instances


# ---------------------------------------------------------------- sync() and its order
def record_syncs(monkeypatch: pytest.MonkeyPatch, record: Callable[[str, str], None]) -> None:
    """Call ``record(kind, file name)`` for every fdatasync/fsync, just before it runs."""
    real = {"fdatasync": os.fdatasync, "fsync": os.fsync}

    def wrap(kind: str) -> Callable[[int], None]:
        def call(fd: int) -> None:
            record(kind, os.path.basename(os.readlink(f"/proc/self/fd/{fd}")))
            real[kind](fd)

        return call

    monkeypatch.setattr(os, "fdatasync", wrap("fdatasync"))
    monkeypatch.setattr(os, "fsync", wrap("fsync"))


@pytest.fixture
def events(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str]]:
    """fdatasync/fsync calls (with the file's name) as they happen."""
    recorded: list[tuple[str, str]] = []
    record_syncs(monkeypatch, lambda kind, name: recorded.append((kind, name)))
    return recorded


def trace(store: Store, events: list[tuple[str, str]]) -> None:
    """Record the connection's SQL statements into ``events`` too (sqlite3's own trace hook)."""
    store._db.set_trace_callback(lambda sql: events.append(("sql", " ".join(sql.split()))))


def durable_commit(events: list[tuple[str, str]]) -> int:
    """Index of the first COMMIT run under synchronous=FULL (checking the pragma goes back to NORMAL after it)."""
    full = events.index(("sql", "PRAGMA synchronous=FULL"))
    commit = events.index(("sql", "COMMIT"), full)
    assert events.index(("sql", "PRAGMA synchronous=NORMAL"), full) > commit
    return commit


def test_sync_syncs_segments_then_the_folder_then_commits_durably(path: Path, events: list[tuple[str, str]]) -> None:
    with Store(path) as store:
        store.open_round(1, 0, None)
        store.sync()
        assert store._db.execute("PRAGMA synchronous").fetchone() == (1,)  # NORMAL between durable writes
        events.clear()
        trace(store, events)
        admit(store, "u1", "a", payload(1), shard=0)
        admit(store, "u2", "b", payload(2), shard=1)
        store.record_receipts([ReceiptRow(time.time(), 1, "a", "u1", "accepted", "", 4096)])
        assert not [e for e in events if e[0] != "sql"], "deferred writes never fsync"
        assert ("sql", "PRAGMA synchronous=FULL") not in events
        events.clear()

        store.sync()
        files = segments(path)
        syncs = [e for e in events if e[0] != "sql"]
        assert sorted(syncs[:2]) == [("fdatasync", name) for name in files]  # each segment written
        assert syncs[2:] == [("fsync", "state"), ("fsync", "agg.sqlite.spool")]  # new folder, new files
        commit = durable_commit(events)
        assert all(events.index(s) < commit for s in syncs)
        assert ("sql", "BEGIN IMMEDIATE") in events[events.index(("sql", "PRAGMA synchronous=FULL")):commit]

        events.clear()
        store.sync()  # nothing written since: nothing at all
        assert events == []

        admit(store, "u3", "c", payload(3), shard=0)  # an existing segment: no folder fsync
        events.clear()
        store.sync()
        syncs = [e for e in events if e[0] != "sql"]
        assert syncs == [("fdatasync", row(path, "u3")[0])]
        assert events.index(syncs[0]) < durable_commit(events)

        store.record_receipts([ReceiptRow(time.time(), 1, "c", "u3", "accepted", "", 4096)])
        events.clear()
        store.sync()  # only a receipt: the durable commit, no file sync
        assert [e for e in events if e[0] != "sql"] == []
        durable_commit(events)


def test_durable_writes_sync_pending_segments_first(path: Path, events: list[tuple[str, str]]) -> None:
    with Store(path) as store:
        store.save_initial("fp", W)
        store.open_round(1, 0, None)
        admit(store, "u1", "a", payload(1))
        trace(store, events)
        events.clear()
        store.mark_closing(1)
        (segment,) = segments(path)
        assert events[:3] == [("fdatasync", segment), ("fsync", "state"), ("fsync", "agg.sqlite.spool")]
        assert durable_commit(events) > 2
        events.clear()
        store.sync()  # the durable commit covered the deferred one
        assert events == []

        store.record_receipts([ReceiptRow(time.time(), 1, "a", "u1", "accepted", "", 4096)])
        events.clear()
        store.close_round(1, 1, "fp", W, {}, accepted=1)  # nothing deferred is left behind a closed round
        assert ("sql", "PRAGMA synchronous=FULL") in events
        events.clear()
        store.sync()
        assert events == []


def test_synchronous_cannot_change_inside_a_transaction(tmp_path: Path) -> None:
    """Why Store switches the pragma around its durable transactions, never inside them."""
    db = sqlite3.connect(tmp_path / "x.sqlite", isolation_level=None)
    db.execute("BEGIN IMMEDIATE")
    with pytest.raises(sqlite3.OperationalError, match="Safety level may not be changed inside a transaction"):
        db.execute("PRAGMA synchronous=FULL")
    db.execute("ROLLBACK")
    db.close()


_STRACED = """
import os, sys, time
from aggregator.store import ReceiptRow, Store
store = Store(sys.argv[1], fsync=sys.argv[2] == "disk")
store.open_round(1, 0, None)
store.sync()
os.write(2, b"== deferred\\n")
for i in range(3):
    store.admit(update_id=f"u{i}", client_id=f"c{i}", round_no=1, base_version=0, num_samples=1, payload=os.urandom(50_000),
                check=lambda s: None)
store.record_receipts([ReceiptRow(time.time(), 1, "c0", "u0", "accepted", "", 1)])
os.write(2, b"== sync\\n")
store.sync() if sys.argv[3] == "sync" else store.sync_soon().result(timeout=30)
os.write(2, b"== end\\n")
os._exit(0)
"""


@pytest.mark.parametrize(("durability", "method"), [("disk", "sync"), ("process", "sync"), ("disk", "sync_soon"), ("process", "sync_soon")])
def test_sqlite_fsyncs_the_wal_only_in_the_durable_commit(path: Path, tmp_path: Path, durability: str, method: str) -> None:
    """The system calls themselves (strace): deferred commits sync nothing; sync() fdatasyncs segments, then the WAL
    (--durability process: nothing at all, yet a store opened after the process died reads every update).
    sync_soon() makes the very same calls, from its thread, without SQLite's help."""
    if shutil.which("strace") is None:
        pytest.skip("no strace")
    path.parent.mkdir(parents=True)
    script = tmp_path / "run.py"
    script.write_text(textwrap.dedent(_STRACED))
    root = Path(__file__).resolve().parents[2]
    log = tmp_path / "strace.log"
    done = subprocess.run(
        ["strace", "-f", "-y", "-o", str(log), "-e", "trace=fsync,fdatasync,sync_file_range,write", "-e", "signal=none",
         sys.executable, str(script), str(path), durability, method],
        capture_output=True, text=True, cwd=root, env={**os.environ, "PYTHONPATH": str(root)}, timeout=60,
    )
    if done.returncode != 0 or "== end" not in done.stderr or not log.is_file():
        pytest.skip(f"strace could not trace here: {done.stderr[-300:]}")
    lines = log.read_text().splitlines()
    start, middle, end = (next(i for i, line in enumerate(lines) if f'"== {mark}' in line)
                          for mark in ("deferred", "sync", "end"))
    syncs = [re.search(r"(fsync|fdatasync)\(\d+<([^>]*)>", line) for line in lines]
    assert not any(syncs[start:middle]), "deferred writes must not sync"
    during = [(m[1], Path(m[2]).name) for m in syncs[middle:end] if m]
    (segment,) = segments(path)
    if durability == "disk":
        assert during == [("fdatasync", segment), ("fsync", "state"), ("fsync", "agg.sqlite.spool"), ("fdatasync", "agg.sqlite-wal")]
    else:
        assert during == []
    with Store(path) as reopened:  # the writer died without closing (os._exit)
        assert [u.update_id for u in reopened.spooled(1)] == ["u0", "u1", "u2"]


def test_sync_soon_syncs_on_its_thread_without_sqlite(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The files sync() would sync, fdatasync'd on the store's sync thread; the WAL through a descriptor of
    its own instead of a FULL commit, so no SQL statement runs (the thread never takes the writers' lock)."""
    calls: list[tuple[str, str, str]] = []
    record_syncs(monkeypatch, lambda kind, name: calls.append((kind, name, threading.current_thread().name)))
    with Store(path) as store:
        store.open_round(1, 0, None)
        statements: list[str] = []
        store._db.set_trace_callback(statements.append)
        admit(store, "u1", "a", payload(1), shard=0)
        admit(store, "u2", "b", payload(2), shard=1)
        store.record_receipts([ReceiptRow(time.time(), 1, "a", "u1", "accepted", "", 4096)])
        calls.clear()
        statements.clear()
        store.sync_soon().result(timeout=10)
        assert statements == []
        assert {thread for _, _, thread in calls} == {"fedge-store-sync_0"}
        synced = [(kind, name) for kind, name, _ in calls]
        assert sorted(synced[:2]) == [("fdatasync", name) for name in segments(path)]
        assert synced[2:] == [("fsync", "state"), ("fsync", "agg.sqlite.spool"), ("fdatasync", "agg.sqlite-wal")]

        calls.clear()
        assert store.sync_soon().done() and calls == []  # nothing written since: nothing at all
        store.record_receipts([ReceiptRow(time.time(), 1, "b", "u2", "accepted", "", 4096)])
        store.sync_soon().result(timeout=10)
        assert [(kind, name) for kind, name, _ in calls] == [("fdatasync", "agg.sqlite-wal")]  # only a row: only the WAL
        calls.clear()
        store.sync()
        assert calls == []  # sync() knows that sync_soon() took care of it


def test_sync_soon_hands_over_segments_the_store_then_closes(path: Path) -> None:
    """A finished round's segment is closed by the store while its sync may still run: the thread syncs a duplicate."""
    with Store(path) as store:
        store.open_round(1, 0, None)
        store.open_round(2, 0, None)
        admit(store, "u1", "a", payload(1))
        spool(store, "u2", "b", payload(2), round_no=2)  # round 1's segment is finished now, not yet synced
        pending = store.sync_soon()
        assert [segment.round for segment in store._segments.values()] == [2]  # round 1's descriptor closed at once
        pending.result(timeout=10)
        assert [u.update_id for u in store.spooled(1)] == ["u1"] and [u.update_id for u in store.spooled(2)] == ["u2"]


# ---------------------------------------------------------------- release and cleanup
def test_close_round_deletes_every_writers_segments_of_that_round(path: Path) -> None:
    with Store(path) as w0, Store(path) as w1:
        w0.save_initial("fp", W)
        w0.open_round(1, 0, None)
        admit(w0, "u1", "a", payload(1), shard=0)
        admit(w1, "u2", "b", payload(2), shard=1)
        spool(w1, "u9", "z", payload(9), round_no=2)
        assert len(segments(path, "r1-*")) == 2
        w0.close_round(1, 1, "fp", W, {}, accepted=2)
        assert segments(path, "r1-*") == [] and len(segments(path, "r2-*")) == 1
        assert w0.spooled(1) == w1.spooled(1) == []
        assert w1.is_accepted("u1") and w1.accepted_ids(1) == ["u1", "u2"]  # still in the ledger: resends are duplicates
        with sqlite3.connect(path) as db:
            assert db.execute("SELECT COUNT(*) FROM accepted WHERE segment IS NOT NULL OR payload IS NOT NULL").fetchone() == (1,)
        assert w1.spooled(2) == [SpooledUpdate("u9", "z", 10, payload(9))]


def test_reopening_deletes_what_a_crash_left_of_closed_rounds_only(path: Path) -> None:
    with Store(path) as store:
        store.save_initial("fp", W)
        store.open_round(1, 0, None)
        admit(store, "u1", "a", payload(1))
        spool(store, "u2", "b", payload(2), round_no=2)
        spool(store, "u3", "c", payload(3), round_no=7)  # a round never opened in the rounds table: not known closed
        store.sync()
        folder = path.with_name("agg.sqlite.spool")
        saved = {name: (folder / name).read_bytes() for name in segments(path, "r1-*")}
        store.close_round(1, 1, "fp", W, {}, accepted=1)
        store.open_round(2, 1, None)
    for name, data in saved.items():  # a crash between close_round's commit and its deletion
        (folder / name).write_bytes(data)
    (folder / "r1-3-00ff.seg").write_bytes(b"another writer's")
    (folder / "notes.txt").write_text("not a segment")
    with Store(path, readonly=True) as reader:  # a read-only store never touches the spool folder
        assert reader.spooled(2) == [SpooledUpdate("u2", "b", 10, payload(2))]
    assert len(segments(path, "r1-*")) == 2
    with Store(path) as store:
        assert segments(path, "r1-*") == []
        assert sorted(p.name for p in folder.iterdir()) == sorted(["notes.txt", *segments(path, "r2-*"), *segments(path, "r7-*")])
        assert store.spooled(2) == [SpooledUpdate("u2", "b", 10, payload(2))]
        assert store.spooled(7) == [SpooledUpdate("u3", "c", 10, payload(3))]


def test_a_live_writer_keeps_its_open_round_segment_when_another_store_opens(path: Path) -> None:
    with Store(path) as worker:
        worker.open_round(1, 0, None)
        admit(worker, "u1", "a", payload(1), shard=0)
        with Store(path) as restarted:  # e.g. a restarted coordinator
            assert restarted.spooled(1, shard=0) == [SpooledUpdate("u1", "a", 10, payload(1))]
        admit(worker, "u2", "b", payload(2), shard=0)
        assert [u.update_id for u in worker.spooled(1)] == ["u1", "u2"]


def test_a_readonly_store_does_not_create_the_spool_folder(path: Path) -> None:
    with Store(path) as store:
        store.open_round(1, 0, None)
    with Store(path, readonly=True) as reader:
        assert reader.spooled(1) == []
    assert not path.with_name("agg.sqlite.spool").exists()


# ---------------------------------------------------------------- what a power cut leaves
def test_missing_short_or_corrupt_bytes_drop_their_row(path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with Store(path) as store:
        store.open_round(1, 0, None)
        for i in range(4):
            admit(store, f"u{i}", f"c{i}", payload(i), shard=0)
        admit(store, "u8", "c8", payload(8), shard=1)
        store.sync()
        folder = path.with_name("agg.sqlite.spool")
        seg0, off1, _ = row(path, "u1")
        with open(folder / seg0, "r+b") as f:  # a torn write in u1
            f.seek(off1 + 100)
            byte = f.read(1)
            f.seek(off1 + 100)
            f.write(bytes([byte[0] ^ 0x01]))
        os.truncate(folder / seg0, row(path, "u3")[1] + 1000)  # u3 cut short (the end of the segment)
        os.unlink(folder / row(path, "u8")[0])  # u8's segment never reached the disk
        with caplog.at_level(logging.WARNING, logger="fedge.aggregator"):
            spooled = store.spooled(1)
        assert spooled == [SpooledUpdate("u0", "c0", 10, payload(0)), SpooledUpdate("u2", "c2", 10, payload(2))]
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 3
        for uid, what in (("u1", "corrupt"), ("u3", "short (1000 of 4096 bytes)"), ("u8", "missing")):
            (message,) = [m for m in warnings if f"update {uid} " in m]
            assert f"client c{uid[1]}" in message and "round 1" in message and what in message
        assert [store.is_accepted(f"u{i}") for i in (0, 1, 2, 3, 8)] == [True, False, True, False, False]
        assert store.standing(1, "u1", "c1") == Standing(update_seen=False, client_seen=False, accepted=2, closing=False)

        caplog.clear()
        admit(store, "u1", "c1", payload(1), shard=0)  # the sender's resend is accepted again
        store.sync()
        assert [u.update_id for u in store.spooled(1)] == ["u0", "u2", "u1"]
        assert store.spooled(1)[2].payload == payload(1)
        assert not caplog.records


def test_a_readonly_store_reports_bad_bytes_but_keeps_the_row(path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with Store(path) as store:
        store.open_round(1, 0, None)
        admit(store, "u1", "a", payload(1))
    os.truncate(path.with_name("agg.sqlite.spool") / row(path, "u1")[0], 10)
    with Store(path, readonly=True) as reader, caplog.at_level(logging.WARNING, logger="fedge.aggregator"):
        assert reader.spooled(1) == []
        assert reader.is_accepted("u1")
    assert "u1" in caplog.text and "read-only" in caplog.text


# ---------------------------------------------------------------- stores written before segments
_BEFORE_SEGMENTS = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE checkpoints (
    version INTEGER PRIMARY KEY, created REAL NOT NULL, fingerprint TEXT NOT NULL,
    weights BLOB NOT NULL, strategy_state BLOB NOT NULL);
CREATE TABLE rounds (
    round INTEGER PRIMARY KEY, base_version INTEGER NOT NULL, opened REAL NOT NULL,
    deadline REAL, closed REAL, accepted INTEGER NOT NULL DEFAULT 0, extensions INTEGER NOT NULL DEFAULT 0,
    metrics TEXT NOT NULL DEFAULT '{}', closing INTEGER NOT NULL DEFAULT 0);
CREATE TABLE accepted (
    update_id TEXT PRIMARY KEY, client_id TEXT NOT NULL, round INTEGER NOT NULL,
    base_version INTEGER NOT NULL, num_samples INTEGER NOT NULL, received REAL NOT NULL,
    bytes INTEGER NOT NULL, payload BLOB, shard INTEGER);
CREATE INDEX accepted_round ON accepted(round);
CREATE TABLE receipts (
    id INTEGER PRIMARY KEY AUTOINCREMENT, at REAL NOT NULL, round INTEGER NOT NULL,
    client_id TEXT NOT NULL, update_id TEXT, status TEXT NOT NULL, reason TEXT NOT NULL, bytes INTEGER NOT NULL);
CREATE INDEX accepted_round_client ON accepted(round, client_id);
INSERT INTO rounds (round, base_version, opened, closed, accepted) VALUES (1, 0, 0, 5, 1);
INSERT INTO rounds (round, base_version, opened) VALUES (2, 1, 6);
INSERT INTO accepted VALUES ('old1', 'a', 1, 0, 10, 1, 0, NULL, NULL);
"""


@pytest.fixture
def legacy(path: Path) -> Iterator[Path]:
    """A store as the previous release wrote it: payloads inside SQLite, no segment columns."""
    path.parent.mkdir(parents=True)
    with sqlite3.connect(path) as db:
        db.executescript(_BEFORE_SEGMENTS)
        db.execute("INSERT INTO accepted VALUES ('old2', 'b', 2, 1, 10, 7, 4096, ?, NULL)", (payload(2),))
        db.execute("INSERT INTO accepted VALUES ('old3', 'c', 2, 1, 10, 8, 4096, ?, 1)", (payload(3),))
    yield path


def test_a_store_from_before_segments_still_yields_its_spool(legacy: Path) -> None:
    with Store(legacy) as store:
        assert store.spooled(2) == [SpooledUpdate("old2", "b", 10, payload(2)), SpooledUpdate("old3", "c", 10, payload(3))]
        assert store.spooled(2, shard=1) == [SpooledUpdate("old3", "c", 10, payload(3))]
        assert store.spooled(1) == []
        store.open_round(2, 1, None)  # re-opening recounts the round's rows, written before the store counted them
        assert store.standing(2, "x", "x").accepted == 2
        store.spool(update_id="new4", client_id="d", round_no=2, base_version=1, num_samples=10, payload=payload(4), shard=1)
        assert store.standing(2, "x", "x").accepted == 3  # and counts from then on
        assert [u.update_id for u in store.spooled(2)] == ["old2", "old3", "new4"]
        assert store.spooled(2)[2].payload == payload(4)
        assert store.is_accepted("old1") and store.is_accepted("old2")
    with sqlite3.connect(legacy) as db:
        columns = {r[1] for r in db.execute("PRAGMA table_info(accepted)")}
        assert {"segment", "offset", "digest", "payload"} <= columns
    with Store(legacy) as store:
        store.save_initial("fp", W)
        store.close_round(2, 1, "fp", W, {}, accepted=3)  # releases the legacy payloads and the new segment alike
        assert store.spooled(2) == [] and segments(legacy) == []
    with sqlite3.connect(legacy) as db:
        assert db.execute("SELECT COUNT(*) FROM accepted WHERE payload IS NOT NULL OR segment IS NOT NULL").fetchone() == (0,)
