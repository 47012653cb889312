"""Where the delta broadcaster's state lives in the aggregator's SQLite store (aggregator/broadcasting/).

Two tables, written inside the transaction that commits the checkpoint of the same version (the
caller passes its open sqlite3 connection), so a restarted aggregator finds the broadcast state of
exactly the checkpoint it resumes:

    broadcast_header  one row: the version and the Broadcaster's small header (a few hundred bytes)
    broadcast_items   the immutable items by key (``keyframe/<k>``, ``delta/<u>``, ``latest/<v>``):
                      each inserted once, deleted when the header stops naming it

So a version costs one small header plus its new delta (and a keyframe every K versions), not a
copy of the held model and the keyframe: for a 10M-parameter model that is ~0.5 MB instead of ~80 MB
per checkpoint. ``load`` returns None when there is no state or it belongs to another version than
the checkpoint (a store written before delta broadcasts, or a crash between two transactions of an
older release); the coordinator then begins afresh with a full keyframe.
"""

from __future__ import annotations

import sqlite3

from aggregator.store.records import BroadcastState
from fedge_contract.packing import steps

__all__ = ["SCHEMA", "create", "load", "save"]

SCHEMA = """
CREATE TABLE IF NOT EXISTS broadcast_header (
    slot INTEGER PRIMARY KEY CHECK (slot = 0), version INTEGER NOT NULL, header BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS broadcast_items (key TEXT PRIMARY KEY, blob BLOB NOT NULL);
"""


def create(db: sqlite3.Connection) -> None:
    """Create the tables if missing (idempotent; the store calls it where it migrates its schema)."""
    db.executescript(SCHEMA)


def save(db: sqlite3.Connection, state: BroadcastState) -> int:
    """Write ``state`` in the caller's transaction; returns the bytes of items newly written.

    A new item is written in place a step at a time (SQLite's incremental blob I/O), as checkpoints
    are: binding a keyframe of a large model as one parameter would copy it whole holding the GIL.
    """
    held = {key for (key,) in db.execute("SELECT key FROM broadcast_items")}
    written = 0
    for key, item in state.items.items():
        if key in held:
            continue
        parts = (item,) if isinstance(item, bytes) else item
        size = sum(len(part) for part in parts)
        row = db.execute("INSERT INTO broadcast_items VALUES (?, zeroblob(?))", (key, size)).lastrowid
        assert row is not None
        with db.blobopen("broadcast_items", "blob", row) as blob:
            for step in steps(parts):
                blob.write(step)
        written += size
    for key in held - set(state.items):
        db.execute("DELETE FROM broadcast_items WHERE key=?", (key,))
    db.execute(
        "INSERT INTO broadcast_header VALUES (0, ?, ?) ON CONFLICT(slot) DO UPDATE SET version=excluded.version, header=excluded.header",
        (state.version, state.header),
    )
    return written


def load(db: sqlite3.Connection, version: int) -> BroadcastState | None:
    """The state committed with the checkpoint of ``version``, or None (none, or another version's)."""
    try:
        row = db.execute("SELECT version, header FROM broadcast_header WHERE slot=0").fetchone()
    except sqlite3.OperationalError:  # a store made before delta broadcasts
        return None
    if row is None or row[0] != version:
        return None
    items = {key: bytes(blob) for key, blob in db.execute("SELECT key, blob FROM broadcast_items")}
    return BroadcastState(int(row[0]), bytes(row[1]), items)
