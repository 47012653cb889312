"""Secure aggregation's share of the store (issue 17): each round's protocol sessions and their masked inputs.

Two tables, created with the rest of the schema on opening (so older stores get them too):

- ``secure_sessions``: one row per session of a round (a retry after an abandoned session is a new
  one): the relay's last checkpoint (``SecAggRelay.snapshot()`` as msgpack: public keys, sealed boxes,
  digests, revealed shares; never a vector) and its outcome;
- ``secure_inputs``: the masked inputs of the running sessions, by (round, session, client), spooled
  before the relay folds them.

Nothing here is an individual delta: a masked input is the delta plus a self mask and pair masks,
and the checkpoint never holds both secrets of one device (fedge_contract/secagg/DESIGN.md).

Durability: a checkpoint is a durable transaction; a masked input is a deferred write (committed,
not fsync'd), like an update before its receipt. That is enough: a checkpoint's FULL commit
fsyncs the WAL and with it every input spooled before it, so every input a checkpoint counts is on
disk with it; an input lost to an OS crash after the last checkpoint was never counted by a
checkpoint, and its device sends it again when the resumed session republishes its phase. An
abandoned session's inputs are deleted in the transaction that records why; closing the round
deletes the rest and the checkpoints' bodies in the transaction that writes the new model.
"""

from __future__ import annotations

import sqlite3
import time
from contextlib import AbstractContextManager

from aggregator.store.records import SecureSession

SECURE_SCHEMA = """
CREATE TABLE IF NOT EXISTS secure_sessions (
    round INTEGER NOT NULL, session TEXT NOT NULL, started REAL NOT NULL, updated REAL NOT NULL,
    snapshot BLOB, outcome TEXT, PRIMARY KEY (round, session));
CREATE TABLE IF NOT EXISTS secure_inputs (
    round INTEGER NOT NULL, session TEXT NOT NULL, client_id TEXT NOT NULL, received REAL NOT NULL,
    payload BLOB NOT NULL, PRIMARY KEY (round, session, client_id));
"""


class SecureSessions:
    """The Store's secure-aggregation methods (a mixin: the Store provides its connection and transactions)."""

    _db: sqlite3.Connection
    _deferred: bool

    def _tx(self) -> AbstractContextManager[sqlite3.Connection]:
        raise NotImplementedError

    def _durable(self) -> AbstractContextManager[sqlite3.Connection]:
        raise NotImplementedError

    def secure_checkpoint(self, round_no: int, session: str, snapshot: bytes, outcome: str | None) -> None:
        """Durably record the session's checkpoint and outcome; an abandoned session's spooled inputs go with it."""
        now = time.time()
        with self._durable() as db:
            db.execute(
                "INSERT INTO secure_sessions (round, session, started, updated, snapshot, outcome) VALUES (?, ?, ?, ?, ?, ?) "
                "ON CONFLICT(round, session) DO UPDATE SET updated=excluded.updated, snapshot=excluded.snapshot, outcome=excluded.outcome",
                (round_no, session, now, now, snapshot, outcome),
            )
            if outcome is not None and outcome.startswith("abandoned"):
                db.execute("DELETE FROM secure_inputs WHERE round=? AND session=?", (round_no, session))

    def secure_abandon(self, round_no: int, session: str, outcome: str) -> None:
        """Durably mark a session abandoned without a new checkpoint (one that cannot be resumed) and drop its inputs."""
        with self._durable() as db:
            db.execute("UPDATE secure_sessions SET outcome=?, updated=? WHERE round=? AND session=?", (outcome, time.time(), round_no, session))
            db.execute("DELETE FROM secure_inputs WHERE round=? AND session=?", (round_no, session))

    def secure_spool(self, round_no: int, session: str, client_id: str, payload: bytes) -> None:
        """Spool a masked input before the relay folds it (deferred: see the module docstring). The first one
        of a (round, session, client) stays: the session takes one input per device."""
        with self._tx() as db:
            db.execute("INSERT OR IGNORE INTO secure_inputs VALUES (?, ?, ?, ?, ?)", (round_no, session, client_id, time.time(), payload))
        self._deferred = True

    def secure_sessions(self, round_no: int) -> list[SecureSession]:
        """The round's sessions, oldest first."""
        rows = self._db.execute(
            "SELECT session, started, snapshot, outcome FROM secure_sessions WHERE round=? ORDER BY started, rowid", (round_no,)
        ).fetchall()
        return [SecureSession(session, started, snapshot, outcome) for session, started, snapshot, outcome in rows]

    def secure_inputs(self, round_no: int, session: str) -> list[bytes]:
        """The masked inputs spooled for a session, in arrival order."""
        rows = self._db.execute(
            "SELECT payload FROM secure_inputs WHERE round=? AND session=? ORDER BY received, rowid", (round_no, session)
        ).fetchall()
        return [bytes(row[0]) for row in rows]

    @staticmethod
    def _release_secure(db: sqlite3.Connection, round_no: int) -> None:
        """Inside the transaction that closes ``round_no``: its masked inputs and checkpoints' bodies go (outcomes stay)."""
        db.execute("DELETE FROM secure_inputs WHERE round=?", (round_no,))
        db.execute("UPDATE secure_sessions SET snapshot=NULL WHERE round=?", (round_no,))
