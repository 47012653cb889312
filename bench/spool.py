"""The store's spool, before and after segment files: ms per accepted update, in one run.

``segments`` (aggregator/store.py now): per update ``Store.admit`` (payload appended to this
instance's segment file, row committed with synchronous=NORMAL, neither fsync'd) and
``record_receipts`` (deferred too); one ``Store.sync()`` per batch of 1, 8 or 32 updates (fdatasync
of the segment, then one durable SQLite commit), as the ingest path does before publishing a
batch's receipts.

``sqlite_blob`` (the previous design, inline here): per update one ``BEGIN IMMEDIATE`` transaction
with the admission queries and the payload as a BLOB row, committed with synchronous=FULL, then
the receipt row in a second fsync'd commit. Batching does not change it (every commit syncs); it
is run per batch size anyway, which shows the noise.

Figures: ``ingest_ms`` = the updates' admits, receipts and syncs / updates; ``with_close_ms``
adds closing the round (checkpoint + release: SET payload=NULL and the WAL checkpoint it causes,
or deleting the segment files), spread over the round's updates. Median of ``--reps`` rounds.
``reference``: checksums of one payload (``admit`` computes the CRC-32, part of ``segments``;
blake2b-128 and sha256 for comparison), and appending the payloads to a plain file with one
fdatasync per 16, the floor of any spool.

Payloads are random bytes (nothing compresses). Everything shares this machine's disk and cores,
so compare inside one run. Prints JSON. Run: python -m bench.spool [--quick] [--dir PATH]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import sqlite3
import statistics
import tempfile
import time
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from aggregator.store import ReceiptRow, Store

SIZES = {"96KB": 96 * 1024, "1MB": 1 << 20, "4MB": 4 << 20}
BATCHES = (1, 8, 32)
WEIGHTS = {"w": np.zeros(16, np.float32)}


def _payloads(size: int, count: int = 4) -> list[bytes]:
    rng = np.random.default_rng(size)
    return [rng.bytes(size) for _ in range(count)]


def _updates_per_round(size: int, quick: bool) -> int:
    """Enough updates for a stable figure (a multiple of the largest batch), ~64-128 MB a round."""
    budget = (32 if quick else 128) << 20
    return max(32, min(512, budget // size // 32 * 32))


def _bench_segments(folder: Path, size: int, batch: int, rounds: int, per_round: int) -> dict[str, float]:
    payloads = _payloads(size)
    ingest, total = [], []
    with Store(folder / f"seg-{size}-{batch}.sqlite") as store:
        store.save_initial("fp", WEIGHTS)
        for r in range(1, rounds + 1):
            store.open_round(r, r - 1, None)
            start = time.perf_counter()
            for i in range(per_round):
                uid = f"r{r}-u{i}"
                store.admit(update_id=uid, client_id=f"c{i}", round_no=r, base_version=r - 1, num_samples=1,
                            payload=payloads[i % len(payloads)], check=lambda standing: None, shard=0)
                store.record_receipts([ReceiptRow(time.time(), r, f"c{i}", uid, "accepted", "", size)])
                if (i + 1) % batch == 0:
                    store.sync()
            store.sync()
            ingested = time.perf_counter()
            store.mark_closing(r)
            store.close_round(r, r, "fp", WEIGHTS, {}, per_round)
            closed = time.perf_counter()
            ingest.append((ingested - start) / per_round * 1e3)
            total.append((closed - start) / per_round * 1e3)
    return {"ingest_ms": round(statistics.median(ingest), 3), "with_close_ms": round(statistics.median(total), 3)}


_BLOB_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS checkpoints (version INTEGER PRIMARY KEY, created REAL NOT NULL, weights BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS rounds (
    round INTEGER PRIMARY KEY, opened REAL NOT NULL, closed REAL, closing INTEGER NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS accepted (
    update_id TEXT PRIMARY KEY, client_id TEXT NOT NULL, round INTEGER NOT NULL, base_version INTEGER NOT NULL,
    num_samples INTEGER NOT NULL, received REAL NOT NULL, bytes INTEGER NOT NULL, payload BLOB, shard INTEGER);
CREATE INDEX IF NOT EXISTS accepted_round ON accepted(round);
CREATE INDEX IF NOT EXISTS accepted_round_client ON accepted(round, client_id);
CREATE TABLE IF NOT EXISTS receipts (
    id INTEGER PRIMARY KEY AUTOINCREMENT, at REAL NOT NULL, round INTEGER NOT NULL,
    client_id TEXT NOT NULL, update_id TEXT, status TEXT NOT NULL, reason TEXT NOT NULL, bytes INTEGER NOT NULL);
"""


def _bench_sqlite_blob(folder: Path, size: int, batch: int, rounds: int, per_round: int) -> dict[str, float]:
    """The previous store's hot path, statement for statement (batch is ignored: every commit is fsync'd)."""
    payloads = _payloads(size)
    db = sqlite3.connect(folder / f"blob-{size}-{batch}.sqlite", isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")
    db.executescript(_BLOB_SCHEMA)
    ingest, total = [], []
    for r in range(1, rounds + 1):
        db.execute("INSERT INTO rounds (round, opened) VALUES (?, ?)", (r, time.time()))
        start = time.perf_counter()
        for i in range(per_round):
            uid, client = f"r{r}-u{i}", f"c{i}"
            db.execute("BEGIN IMMEDIATE")
            db.execute("SELECT value FROM meta WHERE key='epoch'").fetchone()
            db.execute("SELECT closing, closed FROM rounds WHERE round=?", (r,)).fetchone()
            db.execute("SELECT 1 FROM accepted WHERE update_id=?", (uid,)).fetchone()
            db.execute("SELECT 1 FROM accepted WHERE round=? AND client_id=?", (r, client)).fetchone()
            db.execute("SELECT COUNT(*) FROM accepted WHERE round=?", (r,)).fetchone()
            db.execute(
                "INSERT INTO accepted (update_id, client_id, round, base_version, num_samples, received, bytes, payload, shard) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (uid, client, r, r - 1, 1, time.time(), size, payloads[i % len(payloads)], 0),
            )
            db.execute("COMMIT")
            db.execute(
                "INSERT INTO receipts (at, round, client_id, update_id, status, reason, bytes) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (time.time(), r, client, uid, "accepted", "", size),
            )
        ingested = time.perf_counter()
        db.execute("UPDATE rounds SET closing=1 WHERE round=?", (r,))
        db.execute("BEGIN IMMEDIATE")
        db.execute("INSERT INTO checkpoints VALUES (?, ?, ?)", (r, time.time(), b"w" * 64))
        db.execute("UPDATE rounds SET closed=? WHERE round=?", (time.time(), r))
        db.execute("UPDATE accepted SET payload=NULL WHERE round=?", (r,))
        db.execute("COMMIT")
        closed = time.perf_counter()
        ingest.append((ingested - start) / per_round * 1e3)
        total.append((closed - start) / per_round * 1e3)
    db.close()
    return {"ingest_ms": round(statistics.median(ingest), 3), "with_close_ms": round(statistics.median(total), 3)}


def _file_append(folder: Path, size: int, count: int, every: int = 16) -> float:
    payloads = _payloads(size)
    fd = os.open(folder / f"plain-{size}.bin", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        start = time.perf_counter()
        for i in range(count):
            os.write(fd, payloads[i % len(payloads)])
            if (i + 1) % every == 0:
                os.fdatasync(fd)
        os.fdatasync(fd)
        return (time.perf_counter() - start) / count * 1e3
    finally:
        os.close(fd)
        os.unlink(folder / f"plain-{size}.bin")


def _timed(fn: Callable[[], object], repeat: int) -> float:
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - start) / repeat * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer and smaller rounds")
    parser.add_argument("--reps", type=int, default=3, help="rounds per figure (median)")
    parser.add_argument("--dir", type=Path, default=None, help="where the stores go (default: a temporary folder)")
    args = parser.parse_args()
    reps = 1 if args.quick else args.reps
    out: dict[str, Any] = {
        "machine": {"cpus": os.cpu_count(), "sqlite": sqlite3.sqlite_version, "python": platform.python_version()},
        "params": {
            "batches": list(BATCHES), "reps": reps,
            "updates_per_round": {k: _updates_per_round(v, args.quick) for k, v in SIZES.items()},
        },
        "reference": {"blake2b128_ms": {}, "sha256_ms": {}, "crc32_ms": {}, "file_append_fdatasync_per_16_ms": {}},
        "segments": {}, "sqlite_blob": {}, "speedup_ingest": {},
    }
    with tempfile.TemporaryDirectory(prefix="bench-spool-", dir=args.dir) as tmp:
        folder = Path(tmp)
        for label, size in SIZES.items():
            per_round = _updates_per_round(size, args.quick)
            payload = _payloads(size, 1)[0]
            blake = _timed(lambda payload=payload: hashlib.blake2b(payload, digest_size=16).digest(), 20)
            out["reference"]["blake2b128_ms"][label] = round(blake, 3)
            out["reference"]["sha256_ms"][label] = round(_timed(lambda payload=payload: hashlib.sha256(payload).digest(), 20), 3)
            out["reference"]["crc32_ms"][label] = round(_timed(lambda payload=payload: zlib.crc32(payload), 20), 3)
            out["reference"]["file_append_fdatasync_per_16_ms"][label] = round(_file_append(folder, size, per_round), 3)
            out["segments"][label], out["sqlite_blob"][label], out["speedup_ingest"][label] = {}, {}, {}
            for batch in BATCHES:
                new = _bench_segments(folder, size, batch, reps, per_round)
                old = _bench_sqlite_blob(folder, size, batch, reps, per_round)
                out["segments"][label][f"batch_{batch}"] = new
                out["sqlite_blob"][label][f"batch_{batch}"] = old
                out["speedup_ingest"][label][f"batch_{batch}"] = round(old["ingest_ms"] / new["ingest_ms"], 2)
                for entry in folder.iterdir():  # keep the disk footprint of the run small
                    if entry.is_dir():
                        shutil.rmtree(entry)
                    else:
                        entry.unlink()
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
