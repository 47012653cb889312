"""The aggregator's embedded SQLite store: checkpoints, rounds, accepted updates and receipts.

What a restart needs is here, written before it is acted on:
- a checkpoint per model version (weights + strategy state), written in the same transaction
  that closes its round, before the new model is published;
- every accepted update of the open round (its raw payload, the "spool") before its receipt,
  so a killed aggregator re-folds them on restart and never counts one twice (update_id is the
  primary key);
- one row per receipt sent, for the report and for audits.
WAL mode with ``synchronous=FULL``: a commit survives a power cut; measured ~0.5 ms per commit here.

With ingest workers (aggregator/worker.py) several processes write here at once, and the store
is their shared admission ledger: ``admit`` decides and spools an update in one ``BEGIN
IMMEDIATE`` transaction (SQLite serialises writers; a busy one waits up to ``BUSY_TIMEOUT``), so
dedupe and the round's target hold across processes. Each spooled row names the worker
(``shard``) that folded it. ``meta.epoch`` fences out the workers of a coordinator that died:
each aggregator start takes a new epoch, and an admission under an older one is refused.
Weights are stored as raw float32 msgpack (fedge_contract.pack_weights), never pickled.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np

from aggregator.errors import Superseded
from aggregator.rounds import Standing
from fedge_contract.messages import pack_weights, unpack_weights

BUSY_TIMEOUT = 60.0  # seconds a writer waits for another process's transaction (they last milliseconds)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS checkpoints (
    version INTEGER PRIMARY KEY, created REAL NOT NULL, fingerprint TEXT NOT NULL,
    weights BLOB NOT NULL, strategy_state BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS rounds (
    round INTEGER PRIMARY KEY, base_version INTEGER NOT NULL, opened REAL NOT NULL,
    deadline REAL, closed REAL, accepted INTEGER NOT NULL DEFAULT 0, extensions INTEGER NOT NULL DEFAULT 0,
    metrics TEXT NOT NULL DEFAULT '{}', closing INTEGER NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS accepted (
    update_id TEXT PRIMARY KEY, client_id TEXT NOT NULL, round INTEGER NOT NULL,
    base_version INTEGER NOT NULL, num_samples INTEGER NOT NULL, received REAL NOT NULL,
    bytes INTEGER NOT NULL, payload BLOB, shard INTEGER);
CREATE INDEX IF NOT EXISTS accepted_round ON accepted(round);
CREATE TABLE IF NOT EXISTS receipts (
    id INTEGER PRIMARY KEY AUTOINCREMENT, at REAL NOT NULL, round INTEGER NOT NULL,
    client_id TEXT NOT NULL, update_id TEXT, status TEXT NOT NULL, reason TEXT NOT NULL, bytes INTEGER NOT NULL);
"""
# Columns added after the first release: stores made before get them on opening.
_ADDED_COLUMNS = {
    "rounds": ("closing", "INTEGER NOT NULL DEFAULT 0"),  # 1 once the round stopped admitting (aggregating)
    "accepted": ("shard", "INTEGER"),  # the ingest worker that folded the update (NULL: the aggregator itself)
}
_ADDED_INDEXES = "CREATE INDEX IF NOT EXISTS accepted_round_client ON accepted(round, client_id);"


@dataclass(frozen=True)
class Checkpoint:
    version: int
    fingerprint: str
    weights: dict[str, np.ndarray]
    strategy_state: dict[str, np.ndarray]


@dataclass(frozen=True)
class SpooledUpdate:
    update_id: str
    client_id: str
    num_samples: int
    payload: bytes


class Store:
    def __init__(self, path: Path | str, *, readonly: bool = False) -> None:
        """Open (creating if needed) the store; ``readonly`` opens an existing one for reports,
        never writing to it (a file that is not a fedge store stays untouched)."""
        self.path = Path(path)
        if readonly:
            if not self.path.is_file():
                raise FileNotFoundError(f"no store at {self.path}")
            self._db = sqlite3.connect(f"{self.path.resolve().as_uri()}?mode=ro", uri=True, isolation_level=None)
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.path, isolation_level=None, timeout=BUSY_TIMEOUT)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_SCHEMA)
        self._migrate()

    def _migrate(self) -> None:
        with self._tx() as db:
            for table, (column, declaration) in _ADDED_COLUMNS.items():
                if column not in {row[1] for row in db.execute(f"PRAGMA table_info({table})")}:
                    db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {declaration}")
        self._db.executescript(_ADDED_INDEXES)

    def __enter__(self) -> Store:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        self._db.close()

    def _tx(self) -> _Transaction:
        """``with store._tx() as db:`` runs one transaction (commit on success, rollback on error)."""
        return _Transaction(self._db)

    # -- identity: one store belongs to one fleet
    def claim(self, key: str, value: str) -> str | None:
        """Record meta[key]=value unless already set; return the previous value if it differs."""
        row = self._db.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        if row is None:
            self._db.execute("INSERT INTO meta VALUES (?, ?)", (key, value))
            return None
        return None if row[0] == value else str(row[0])

    def take_over(self) -> int:
        """Start a new epoch and return it: admissions under an earlier one (a dead coordinator's workers) fail from now on."""
        with self._tx() as db:
            row = db.execute("SELECT value FROM meta WHERE key='epoch'").fetchone()
            epoch = int(row[0]) + 1 if row else 1
            db.execute("INSERT INTO meta VALUES ('epoch', ?) ON CONFLICT(key) DO UPDATE SET value=excluded.value", (str(epoch),))
        return epoch

    # -- checkpoints
    def latest_checkpoint(self) -> Checkpoint | None:
        row = self._db.execute(
            "SELECT version, fingerprint, weights, strategy_state FROM checkpoints ORDER BY version DESC LIMIT 1"
        ).fetchone()
        if row is None:
            return None
        return Checkpoint(row[0], row[1], unpack_weights(row[2]), unpack_weights(row[3]))

    def save_initial(self, fingerprint: str, weights: Mapping[str, np.ndarray]) -> None:
        with self._tx() as db:
            db.execute(
                "INSERT INTO checkpoints VALUES (0, ?, ?, ?, ?)",
                (time.time(), fingerprint, pack_weights(weights), pack_weights({})),
            )

    def close_round(
        self,
        round_no: int,
        version: int,
        fingerprint: str,
        weights: Mapping[str, np.ndarray],
        strategy_state: Mapping[str, np.ndarray],
        accepted: int,
    ) -> None:
        """Atomically: the new checkpoint, the round marked closed, its spool released."""
        with self._tx() as db:
            db.execute(
                "INSERT INTO checkpoints VALUES (?, ?, ?, ?, ?)",
                (version, time.time(), fingerprint, pack_weights(weights), pack_weights(strategy_state)),
            )
            db.execute("UPDATE rounds SET closed=?, accepted=? WHERE round=?", (time.time(), accepted, round_no))
            db.execute("UPDATE accepted SET payload=NULL WHERE round=?", (round_no,))

    # -- rounds
    def open_round(self, round_no: int, base_version: int, deadline: float | None) -> None:
        """Record that ``round_no`` is open (re-opening after a restart keeps its first opening time)."""
        with self._tx() as db:
            db.execute(
                "INSERT INTO rounds (round, base_version, opened, deadline) VALUES (?, ?, ?, ?) "
                "ON CONFLICT(round) DO UPDATE SET deadline=excluded.deadline, closing=0",
                (round_no, base_version, time.time(), deadline),
            )

    def mark_closing(self, round_no: int) -> None:
        """No admission into ``round_no`` after this commits (its partial sums are being merged)."""
        with self._tx() as db:
            db.execute("UPDATE rounds SET closing=1 WHERE round=?", (round_no,))

    def extend_round(self, round_no: int, deadline: float) -> None:
        with self._tx() as db:
            db.execute("UPDATE rounds SET deadline=?, extensions=extensions+1 WHERE round=?", (deadline, round_no))

    def set_round_metrics(self, round_no: int, metrics: Mapping[str, float]) -> None:
        with self._tx() as db:
            db.execute("UPDATE rounds SET metrics=? WHERE round=?", (json.dumps(dict(metrics)), round_no))

    def rounds(self) -> list[dict[str, Any]]:
        cols = ["round", "base_version", "opened", "deadline", "closed", "accepted", "extensions", "metrics"]
        rows = self._db.execute(f"SELECT {', '.join(cols)} FROM rounds ORDER BY round").fetchall()
        out = [dict(zip(cols, row)) for row in rows]
        for row in out:
            row["metrics"] = json.loads(row["metrics"])
        return out

    # -- accepted updates
    def is_accepted(self, update_id: str) -> bool:
        return self._db.execute("SELECT 1 FROM accepted WHERE update_id=?", (update_id,)).fetchone() is not None

    def spool(
        self, *, update_id: str, client_id: str, round_no: int, base_version: int, num_samples: int, payload: bytes, shard: int | None = None
    ) -> None:
        """Persist an accepted update (before its receipt is sent)."""
        with self._tx() as db:
            self._insert_accepted(db, update_id, client_id, round_no, base_version, num_samples, payload, shard)

    def admit(
        self, *, update_id: str, client_id: str, round_no: int, base_version: int, num_samples: int, payload: bytes,
        check: Callable[[Standing], None], shard: int | None = None, epoch: int | None = None,
    ) -> None:
        """Admit and spool an update in one transaction, or raise what ``check`` raises (a Rejection).

        ``check`` sees the round's standing as of this transaction, which no other writer can
        change before it commits: two workers cannot both take the round's last place, nor both
        accept one update id. With ``epoch``, raise Superseded if another aggregator took over.
        """
        with self._tx() as db:
            if epoch is not None:
                row = db.execute("SELECT value FROM meta WHERE key='epoch'").fetchone()
                if row is None or int(row[0]) != epoch:
                    raise Superseded(f"store {self.path} was taken over by another aggregator (epoch {row and row[0]}, ours {epoch})")
            check(self._standing(db, round_no, update_id, client_id))
            self._insert_accepted(db, update_id, client_id, round_no, base_version, num_samples, payload, shard)

    def standing(self, round_no: int, update_id: str, client_id: str) -> Standing:
        """The standing outside a transaction: a cheap early answer that ``admit`` confirms."""
        return self._standing(self._db, round_no, update_id, client_id)

    @staticmethod
    def _standing(db: sqlite3.Connection, round_no: int, update_id: str, client_id: str) -> Standing:
        row = db.execute("SELECT closing, closed FROM rounds WHERE round=?", (round_no,)).fetchone()
        return Standing(
            update_seen=db.execute("SELECT 1 FROM accepted WHERE update_id=?", (update_id,)).fetchone() is not None,
            client_seen=db.execute("SELECT 1 FROM accepted WHERE round=? AND client_id=?", (round_no, client_id)).fetchone() is not None,
            accepted=db.execute("SELECT COUNT(*) FROM accepted WHERE round=?", (round_no,)).fetchone()[0],
            closing=row is None or bool(row[0]) or row[1] is not None,
        )

    @staticmethod
    def _insert_accepted(
        db: sqlite3.Connection, update_id: str, client_id: str, round_no: int, base_version: int, num_samples: int, payload: bytes,
        shard: int | None,
    ) -> None:
        db.execute(
            "INSERT INTO accepted (update_id, client_id, round, base_version, num_samples, received, bytes, payload, shard) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (update_id, client_id, round_no, base_version, num_samples, time.time(), len(payload), payload, shard),
        )

    def spooled(self, round_no: int, *, shard: int | None = None) -> list[SpooledUpdate]:
        """The spooled updates of an open round (with ``shard``: only those that worker folded)."""
        where = "round=? AND payload IS NOT NULL" + (" AND shard=?" if shard is not None else "")
        params = (round_no, shard) if shard is not None else (round_no,)
        rows = self._db.execute(
            f"SELECT update_id, client_id, num_samples, payload FROM accepted WHERE {where} ORDER BY received", params
        ).fetchall()
        return [SpooledUpdate(*row) for row in rows]

    def accepted_by_shard(self, round_no: int) -> dict[int | None, int]:
        """How many of the round's updates each ingest worker admitted (None: the aggregator itself)."""
        return dict(self._db.execute("SELECT shard, COUNT(*) FROM accepted WHERE round=? GROUP BY shard", (round_no,)).fetchall())

    def accepted_ids(self, round_no: int) -> list[str]:
        """Ids of the updates accepted (and so folded) in ``round_no``."""
        rows = self._db.execute("SELECT update_id FROM accepted WHERE round=? ORDER BY received", (round_no,)).fetchall()
        return [r[0] for r in rows]

    def contributions(self, min_base_version: int) -> list[tuple[str, int]]:
        """(client, base version) of accepted updates trained on ``min_base_version`` or later (async dedupe)."""
        rows = self._db.execute("SELECT client_id, base_version FROM accepted WHERE base_version >= ?", (min_base_version,)).fetchall()
        return [(r[0], r[1]) for r in rows]

    # -- receipts
    def record_receipt(self, *, round_no: int, client_id: str, update_id: str | None, status: str, reason: str, nbytes: int) -> None:
        self._db.execute(
            "INSERT INTO receipts (at, round, client_id, update_id, status, reason, bytes) VALUES (?, ?, ?, ?, ?, ?, ?)",
            (time.time(), round_no, client_id, update_id, status, reason, nbytes),
        )

    def receipts(self) -> list[dict[str, Any]]:
        cols = ["at", "round", "client_id", "update_id", "status", "reason", "bytes"]
        rows = self._db.execute(f"SELECT {', '.join(cols)} FROM receipts ORDER BY id").fetchall()
        return [dict(zip(cols, row)) for row in rows]

    def bytes_by_round(self) -> dict[int, int]:
        """Update bytes received per round (every receipt, accepted or not): the fleet's upload traffic."""
        return dict(self._db.execute("SELECT round, SUM(bytes) FROM receipts GROUP BY round").fetchall())


class _Transaction:
    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    def __enter__(self) -> sqlite3.Connection:
        self._db.execute("BEGIN IMMEDIATE")
        return self._db

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self._db.execute("COMMIT" if exc_type is None else "ROLLBACK")
