"""The aggregator's embedded store: SQLite for the ledger, append-only segment files for payloads.

What is where:
- SQLite (``agg.sqlite``, WAL mode): ``meta`` (fleet identity, epoch), ``checkpoints`` (weights
  + strategy state per model version), ``rounds``, ``accepted`` (the admission ledger: one row
  per accepted update, update_id the primary key, naming where its payload lies) and
  ``receipts`` (one row per receipt sent, for the report and audits), ``cohorts`` and ``invited``
  (the rounds that selected a cohort, and whom: admission reads them in its transaction),
  ``broadcast_header`` and ``broadcast_items`` (the delta broadcaster's state, committed with the
  checkpoint of its version: store/broadcast.py);
- segment files in the spool folder beside it (``agg.sqlite.spool/``): the raw payloads of the
  open rounds' accepted updates, appended to ``r{round}-{shard|a}-{token}.seg``. ``token`` is
  random per Store instance, so every file has exactly one writer, which tracks its own offset.
  A row names its segment, offset and length plus a CRC-32 of the bytes. Closing a round
  releases its rows (segment=NULL, in the transaction that writes the checkpoint) and then
  deletes its segment files; a crash between the two leaves files that the next writable
  opening deletes. Stores written before segments keep their payloads in ``accepted.payload``,
  which ``spooled`` still reads.
- secure aggregation's sessions and masked inputs (``secure_sessions``, ``secure_inputs``): see
  store/secure.py.

Durability. Round-level writes (claim, take_over, save_initial, save_broadcast, open_round, mark_closing,
extend_round, set_round_metrics, update_round_metrics, invite, close_round) are durable when they return: the commit runs
with ``synchronous=FULL`` after this instance's pending segment bytes were fdatasync'd, so a
checkpoint never lands without the spool of its round. The per-update writes are *deferred*:
``spool``/``admit`` append the payload with a plain write (no fsync) and commit the row with
``synchronous=NORMAL`` (atomic, survives a process crash, not an OS crash or power cut), and
``record_receipts`` and ``add_bytes_down`` commit the same way. ``sync()`` makes every deferred write of this instance
durable: fdatasync each segment written since the last sync, fsync the spool folder if a segment
was created, then one tiny commit with ``synchronous=FULL``, which fdatasyncs the whole WAL and
so every NORMAL commit before it. The contract: **a receipt is published only after sync()
returned** (or the Future of ``sync_soon()`` completed), so no receipt is ever sent for bytes
that are not on disk. ``sync_soon`` does the same fdatasyncs on a background thread, on the WAL
file itself instead of through a FULL commit, so the ingest loop goes on decoding while the disk
flushes (fdatasync releases the GIL; see the method for why syncing the WAL file is enough). One sync per batch of
updates amortises the fsyncs (measured here: a BLOB row per update in an fsync'd transaction
cost 0.3-0.75 ms per 96 KB and 3-6.7 ms per 1 MB; appending to a file with one fdatasync per 16
updates 0.09 ms per 96 KB and 0.58 ms per 1 MB; bench/spool.py compares both).
Bytes are written before their row is committed, so a committed row's bytes are readable by
every process at once; only an OS crash between a deferred commit and its sync() can leave a row
whose bytes are missing or torn (the kernel may write the WAL back before the segment). Such an
update was never receipted, so ``spooled`` verifies length and digest, deletes a row that fails
(its sender resends it and it is accepted again) and logs a warning: it never returns bad bytes.

With ingest workers (aggregator/workers/) several processes write here at once, and the store
is their shared admission ledger: ``admit`` decides and records an update in one ``BEGIN
IMMEDIATE`` transaction (SQLite serialises writers; a busy one waits up to ``BUSY_TIMEOUT``), so
dedupe and the round's target hold across processes. Each row names the worker (``shard``) that
folded it. ``meta.epoch`` fences out the workers of a coordinator that died: each aggregator
start takes a new epoch, and an admission under an older one is refused.
Weights are stored as raw float32 msgpack (fedge_contract.pack_weights), never pickled.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import logging
import os
import secrets
import sqlite3
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import numpy as np

from aggregator.errors import Superseded
from aggregator.store import broadcast
from aggregator.store.records import BroadcastState, Checkpoint, ReceiptRow, SpooledUpdate, Standing
from aggregator.store.secure import SECURE_SCHEMA, SecureSessions
from aggregator.store.segments import SEGMENT_NAME, Segment, SegmentReader, SyncPlan, Written, digest
from fedge_contract.messages import unpack_weights, weight_pieces
from fedge_contract.packing import steps

log = logging.getLogger("fedge.aggregator")

BUSY_TIMEOUT = 60.0  # seconds a writer waits for another process's transaction (they last milliseconds)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS checkpoints (
    version INTEGER PRIMARY KEY, created REAL NOT NULL, fingerprint TEXT NOT NULL,
    weights BLOB NOT NULL, strategy_state BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS rounds (
    round INTEGER PRIMARY KEY, base_version INTEGER NOT NULL, opened REAL NOT NULL,
    deadline REAL, closed REAL, accepted INTEGER NOT NULL DEFAULT 0, extensions INTEGER NOT NULL DEFAULT 0,
    metrics TEXT NOT NULL DEFAULT '{}', closing INTEGER NOT NULL DEFAULT 0, admitted INTEGER NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS accepted (
    update_id TEXT PRIMARY KEY, client_id TEXT NOT NULL, round INTEGER NOT NULL,
    base_version INTEGER NOT NULL, num_samples INTEGER NOT NULL, received REAL NOT NULL,
    bytes INTEGER NOT NULL, payload BLOB, shard INTEGER, segment TEXT, "offset" INTEGER, digest BLOB);
CREATE INDEX IF NOT EXISTS accepted_round ON accepted(round);
CREATE TABLE IF NOT EXISTS cohorts (round INTEGER PRIMARY KEY, invited INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS invited (round INTEGER NOT NULL, client_id TEXT NOT NULL, PRIMARY KEY (round, client_id)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS receipts (
    id INTEGER PRIMARY KEY AUTOINCREMENT, at REAL NOT NULL, round INTEGER NOT NULL,
    client_id TEXT NOT NULL, update_id TEXT, status TEXT NOT NULL, reason TEXT NOT NULL, bytes INTEGER NOT NULL);
"""
# Columns added after the first release (table, column, declaration): stores made before get them on opening.
_ADDED_COLUMNS = (
    ("rounds", "closing", "INTEGER NOT NULL DEFAULT 0"),  # 1 once the round stopped admitting (aggregating)
    # rows in ``accepted`` for the round, kept by the admitting transaction: a COUNT(*) per
    # admission made a round of n updates cost O(n^2) (recounted when a round is (re)opened)
    ("rounds", "admitted", "INTEGER NOT NULL DEFAULT 0"),
    ("accepted", "shard", "INTEGER"),  # the ingest worker that folded the update (NULL: the aggregator itself)
    ("accepted", "segment", "TEXT"),  # the segment file holding the payload (NULL: legacy ``payload`` column, or released)
    ("accepted", "offset", "INTEGER"),  # where the payload starts in its segment (``bytes`` long)
    ("accepted", "digest", "BLOB"),  # CRC-32 of the payload (4 bytes, big-endian)
    ("rounds", "bytes_down", "INTEGER NOT NULL DEFAULT 0"),  # what one device downloaded for the round's announcements
)
_ADDED_INDEXES = """
CREATE INDEX IF NOT EXISTS accepted_round_client ON accepted(round, client_id);
CREATE TRIGGER IF NOT EXISTS accepted_counted AFTER INSERT ON accepted
    BEGIN UPDATE rounds SET admitted = admitted + 1 WHERE round = NEW.round; END;
CREATE TRIGGER IF NOT EXISTS accepted_uncounted AFTER DELETE ON accepted
    BEGIN UPDATE rounds SET admitted = admitted - 1 WHERE round = OLD.round; END;
"""
_STANDING = """SELECT
    (SELECT closing FROM rounds WHERE round=:round), (SELECT closed FROM rounds WHERE round=:round),
    EXISTS(SELECT 1 FROM accepted WHERE update_id=:update),
    EXISTS(SELECT 1 FROM accepted WHERE round=:round AND client_id=:client),
    COALESCE((SELECT admitted FROM rounds WHERE round=:round), 0),
    (SELECT value FROM meta WHERE key='epoch'),
    NOT EXISTS(SELECT 1 FROM cohorts WHERE round=:round) OR EXISTS(SELECT 1 FROM invited WHERE round=:round AND client_id=:client)"""

class Store(SecureSessions):
    def __init__(self, path: Path | str, *, readonly: bool = False, fsync: bool = True) -> None:
        """Open (creating if needed) the store; ``readonly`` opens an existing one for reports,
        never writing to it nor to its spool folder (a file that is not a fedge store stays untouched).

        ``fsync=False`` (``fedge aggregator --durability process``) keeps the order of writes but
        makes no system call to force them to disk: everything survives a crash of this process
        (the bytes are in the OS's page cache), not an OS crash or a power cut. For hosts where an
        fsync is slow, or storage that is safe without it (battery-backed, replicated).
        """
        self.path = Path(path)
        self.fsync = fsync
        self.spool_dir = self.path.with_name(self.path.name + ".spool")
        self.readonly = readonly
        self._token = secrets.token_hex(8)  # names this instance's segment files
        self._segments: dict[tuple[int, int | None], Segment] = {}  # open for appending, by (round, shard)
        self._unsynced: dict[str, Segment] = {}  # written since the last sync
        self._new_files = False  # a segment file was created since the last sync (the folder needs an fsync)
        self._new_folder = False  # the spool folder's entry in its parent is not known durable yet (its parent needs an fsync)
        self._folder_ready = False  # this instance made sure the spool folder exists
        self._deferred = False  # a NORMAL commit since the last durable one
        self._syncer: concurrent.futures.ThreadPoolExecutor | None = None  # sync_soon's thread, made on first use
        self._last_round: int | None = None  # the round this instance appended to last
        if readonly:
            if not self.path.is_file():
                raise FileNotFoundError(f"no store at {self.path}")
            self._db = sqlite3.connect(f"{self.path.resolve().as_uri()}?mode=ro", uri=True, isolation_level=None)
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.path, isolation_level=None, timeout=BUSY_TIMEOUT)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")  # creating and migrating the schema: durable
        self._db.executescript(_SCHEMA)
        self._db.executescript(SECURE_SCHEMA)  # secure aggregation's sessions and masked inputs (store/secure.py)
        self._migrate()
        self._db.execute("PRAGMA synchronous=NORMAL")  # the default: deferred; durable writes switch to FULL around their commit
        self._delete_released_segments()

    def _migrate(self) -> None:
        with self._tx() as db:
            for table, column, declaration in _ADDED_COLUMNS:
                if column not in {row[1] for row in db.execute(f"PRAGMA table_info({table})")}:
                    db.execute(f'ALTER TABLE {table} ADD COLUMN "{column}" {declaration}')
        self._db.executescript(_ADDED_INDEXES + broadcast.SCHEMA)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        """Sync what is deferred (a clean shutdown loses nothing) and close the files and the database."""
        try:
            if self._syncer is not None:
                self._syncer.shutdown(wait=True)  # background syncs in flight finish (their receipts may never be sent)
            if not self.readonly:
                self.sync()
        finally:
            for segment in self._segments.values():
                os.close(segment.fd)
            self._segments.clear()
            self._unsynced.clear()
            self._db.close()

    def _tx(self) -> _Transaction:
        """``with store._tx() as db:`` runs one transaction (commit on success, rollback on error)."""
        return _Transaction(self._db)

    @contextlib.contextmanager
    def _durable(self) -> Iterator[sqlite3.Connection]:
        """``with store._durable() as db:`` runs one transaction that is on disk when the block ends.

        This instance's pending segment bytes are synced first, then the commit runs with
        ``synchronous=FULL``: it fdatasyncs the WAL, so every earlier NORMAL commit is durable too.
        (SQLite refuses to change ``synchronous`` inside a transaction, hence around it.)
        """
        self._sync_files()
        self._db.execute(f"PRAGMA synchronous={'FULL' if self.fsync else 'NORMAL'}")
        try:
            with self._tx() as db:
                yield db
            self._deferred = False
        finally:
            self._db.execute("PRAGMA synchronous=NORMAL")

    # -- durability of the deferred writes
    def sync(self) -> None:
        """Make every deferred write of this instance durable (admit, spool, record_receipts).

        Publish a receipt only after this returns. Order: fdatasync each segment written since
        the last sync, fsync the spool folder if a segment was created, then one durable SQLite
        commit. Nothing written since the last sync: no system call at all.
        """
        if self._deferred and self.fsync:
            with self._durable() as db:  # syncs the segments first
                upsert = "INSERT INTO meta VALUES ('synced', ?) ON CONFLICT(key) DO UPDATE SET value=excluded.value"
                db.execute(upsert, (repr(time.time()),))  # a tiny write: an empty transaction would sync nothing
        else:
            self._deferred = False  # without fsync, NORMAL commits are as durable as this store is asked to be
            self._sync_files()

    def sync_soon(self) -> concurrent.futures.Future[None]:
        """``sync()`` on a background thread: the Future completes (or fails) once every deferred
        write made before this call is durable. Publish their receipts only then.

        The thread fdatasyncs duplicates of the segments' descriptors, fsyncs the spool folder if
        needed, then fdatasyncs the WAL file (``<store>-wal``) through a descriptor of its own.
        That is what a FULL commit adds to a NORMAL one: in WAL mode every commit appends its
        frames to that file with a plain write, a restart replays every complete, checksummed
        transaction found there, and an fdatasync of the inode flushes the frames whichever
        descriptor wrote them. (Were the WAL gone, a checkpoint would have moved its frames into
        the database file, which SQLite syncs when it checkpoints.) No SQLite call, so the thread
        never contends for the writers' lock. Later writes may or may not be covered.
        Syncs run one at a time, in call order.
        """
        if not self.fsync or not (self._deferred or self._files_pending()):
            self.sync()  # nothing to force (or nothing asked): settle the bookkeeping here
            done: concurrent.futures.Future[None] = concurrent.futures.Future()
            done.set_result(None)
            return done
        plan = self._take_plan(wal=Path(f"{self.path}-wal") if self._deferred else None)
        self._deferred = False
        if self._syncer is None:
            self._syncer = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="fedge-store-sync")
        return self._syncer.submit(plan.run)

    def _sync_files(self) -> None:
        if not self._files_pending():
            return
        if self.fsync:
            self._take_plan(wal=None).run()
        else:
            self._settle_files()

    def _files_pending(self) -> bool:
        return bool(self._unsynced or self._new_files or self._new_folder)

    def _take_plan(self, wal: Path | None) -> SyncPlan:
        """What the next sync of the files must cover (segments through duplicated descriptors, which
        the plan closes), now forgotten here: the plan is run here or on the sync thread."""
        plan = SyncPlan(
            files=[os.dup(segment.fd) for segment in self._unsynced.values()],
            folders=[*([self.spool_dir.parent] if self._new_folder else []), *([self.spool_dir] if self._new_files or self._new_folder else [])],
            wal=wal,
            database=self.path,
        )
        self._settle_files()
        return plan

    def _settle_files(self) -> None:
        """Forget what was synced (or handed to a sync) and close the segments of finished rounds."""
        self._unsynced.clear()
        self._new_files = self._new_folder = False
        for key, segment in list(self._segments.items()):  # a finished round's files: nothing more is appended to them
            if segment.round != self._last_round:
                os.close(segment.fd)
                del self._segments[key]

    def _append(self, round_no: int, shard: int | None, payload: bytes) -> Written:
        """Write ``payload`` at the end of this instance's segment of (round, shard), not yet fsync'd.

        The segment's offset is not advanced here: ``_insert_accepted`` does it once a row refers
        to the bytes, so the bytes of an update that was refused are overwritten by the next append.
        """
        checksum = digest(payload)  # outside any transaction: the writers' lock is not held meanwhile
        segment = self._segments.get((round_no, shard)) or self._open_segment(round_no, shard)
        self._unsynced[segment.name] = segment
        self._last_round = round_no
        view, at = memoryview(payload), segment.offset
        while view:
            written = os.pwrite(segment.fd, view, at)
            view, at = view[written:], at + written
        return Written(segment, segment.offset, len(payload), checksum)

    def _open_segment(self, round_no: int, shard: int | None) -> Segment:
        if not self._folder_ready:  # created here or by another process that may not have synced it yet
            self.spool_dir.mkdir(mode=0o700, exist_ok=True)
            self._folder_ready = self._new_folder = True
        name = f"r{round_no}-{'a' if shard is None else shard}-{self._token}.seg"
        try:
            fd = os.open(self.spool_dir / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            offset = 0
            self._new_files = True
        except FileExistsError:  # ours, closed after a sync and appended to again
            fd = os.open(self.spool_dir / name, os.O_WRONLY | os.O_CLOEXEC)
            offset = os.fstat(fd).st_size
        segment = self._segments[(round_no, shard)] = Segment(round_no, name, fd, offset)
        return segment

    def _delete_released_segments(self, also: int | None = None) -> None:
        """Delete the segment files of closed rounds (and of round ``also``), every writer's.

        Never a file of an open round: a live worker process may be appending to it.
        """
        if not self.spool_dir.is_dir():
            return
        closed = {row[0] for row in self._db.execute("SELECT round FROM rounds WHERE closed IS NOT NULL")}
        if also is not None:
            closed.add(also)
        for entry in os.scandir(self.spool_dir):
            match = SEGMENT_NAME.fullmatch(entry.name)
            if match and int(match[1]) in closed:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(entry.path)

    # -- identity: one store belongs to one fleet
    def claim(self, key: str, value: str) -> str | None:
        """Record meta[key]=value unless already set; return the previous value if it differs."""
        with self._durable() as db:
            row = db.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
            if row is None:
                db.execute("INSERT INTO meta VALUES (?, ?)", (key, value))
                return None
        return None if row[0] == value else str(row[0])

    def take_over(self) -> int:
        """Start a new epoch and return it: admissions under an earlier one (a dead coordinator's workers) fail from now on."""
        with self._durable() as db:
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

    def save_initial(self, fingerprint: str, weights: Mapping[str, np.ndarray], broadcast_state: BroadcastState | None = None) -> None:
        """Durably: version 0's checkpoint, and the broadcast state of version 0 when delta broadcasts are on."""
        with self._durable() as db:
            _insert_checkpoint(db, 0, fingerprint, weights, {})
            if broadcast_state is not None:
                broadcast.save(db, broadcast_state)

    # -- the delta broadcaster's state (store/broadcast.py): committed with the checkpoint of its version
    def save_broadcast(self, state: BroadcastState) -> None:
        """Durably, alone: a broadcast state that begins afresh at the checkpoint a restart resumed
        (its own state was missing or broken), before its keyframe is published."""
        with self._durable() as db:
            broadcast.save(db, state)

    def broadcast_state(self, version: int) -> BroadcastState | None:
        """The broadcast state committed with the checkpoint of ``version`` (None: none, or another version's)."""
        return broadcast.load(self._db, version)

    def close_round(
        self,
        round_no: int,
        version: int,
        fingerprint: str,
        weights: Mapping[str, np.ndarray],
        strategy_state: Mapping[str, np.ndarray],
        accepted: int,
        metrics: Mapping[str, float] | None = None,
        broadcast_state: BroadcastState | None = None,
    ) -> None:
        """Atomically and durably: the new checkpoint, the round marked closed with its ``metrics``
        (a reader never sees a closed round without them), its spool released (and a secure round's masked
        inputs and session checkpoints, store/secure.py), and with delta broadcasts the broadcast state of
        the new version (so a restart resumes both at one version).

        Then the round's segment files are deleted (a crash before that: the next opening does it).
        """
        with self._durable() as db:
            _insert_checkpoint(db, version, fingerprint, weights, strategy_state)
            db.execute("UPDATE rounds SET closed=?, accepted=? WHERE round=?", (time.time(), accepted, round_no))
            if metrics is not None:
                db.execute("UPDATE rounds SET metrics=? WHERE round=?", (json.dumps(dict(metrics)), round_no))
            db.execute("UPDATE accepted SET segment=NULL, payload=NULL WHERE round=?", (round_no,))
            self._release_secure(db, round_no)
            if broadcast_state is not None:
                broadcast.save(db, broadcast_state)
        for key, segment in list(self._segments.items()):
            if segment.round == round_no:
                os.close(segment.fd)
                del self._segments[key]
        # every closed round: also a file a worker created for a refused update while this round closed
        self._delete_released_segments(also=round_no)

    # -- rounds
    def open_round(self, round_no: int, base_version: int, deadline: float | None) -> bool:
        """Record that ``round_no`` is open (re-opening after a restart keeps its first opening time);
        whether it was open before (an aggregator resuming it).

        ``admitted`` is recounted here: the triggers keep it from then on, and a store written
        before the column existed, or rows spooled before the round was recorded, count too.
        """
        with self._durable() as db:
            resumed = db.execute("SELECT 1 FROM rounds WHERE round=?", (round_no,)).fetchone() is not None
            db.execute(
                "INSERT INTO rounds (round, base_version, opened, deadline) VALUES (?, ?, ?, ?) "
                "ON CONFLICT(round) DO UPDATE SET deadline=excluded.deadline, closing=0",
                (round_no, base_version, time.time(), deadline),
            )
            db.execute("UPDATE rounds SET admitted=(SELECT COUNT(*) FROM accepted WHERE round=?) WHERE round=?", (round_no, round_no))
        return resumed

    def mark_closing(self, round_no: int) -> None:
        """No admission into ``round_no`` after this commits (its partial sums are being merged)."""
        with self._durable() as db:
            db.execute("UPDATE rounds SET closing=1 WHERE round=?", (round_no,))

    def extend_round(self, round_no: int, deadline: float | None) -> None:
        with self._durable() as db:
            db.execute("UPDATE rounds SET deadline=?, extensions=extensions+1 WHERE round=?", (deadline, round_no))

    def set_round_metrics(self, round_no: int, metrics: Mapping[str, float]) -> None:
        """Replace a round's figures (what arrives after it closed: devices' evaluations of its model)."""
        with self._durable() as db:
            db.execute("UPDATE rounds SET metrics=? WHERE round=?", (json.dumps(dict(metrics)), round_no))

    def update_round_metrics(self, round_no: int, metrics: Mapping[str, float]) -> None:
        """Add ``metrics`` to a round's figures (replacing those of the same name), in one durable transaction."""
        with self._durable() as db:
            row = db.execute("SELECT metrics FROM rounds WHERE round=?", (round_no,)).fetchone()
            if row is not None:
                db.execute("UPDATE rounds SET metrics=? WHERE round=?", (json.dumps({**json.loads(row[0]), **metrics}), round_no))

    # -- cohorts (rounds/cohort.py): who each round invited, and the selector's state
    def invite(self, round_no: int, clients: Iterable[str], state: Mapping[str, Any]) -> None:
        """Durably: ``clients`` are invited to ``round_no`` (from this commit on, admission refuses the
        others: ``Standing.invited``), and the selector's ``state`` (JSON-able) is what a restart resumes."""
        with self._durable() as db:
            db.executemany("INSERT OR IGNORE INTO invited VALUES (?, ?)", ((round_no, c) for c in clients))
            db.execute("INSERT INTO cohorts VALUES (?, (SELECT COUNT(*) FROM invited WHERE round=?)) "
                       "ON CONFLICT(round) DO UPDATE SET invited=excluded.invited", (round_no, round_no))
            db.execute("INSERT INTO meta VALUES ('cohort', ?) ON CONFLICT(key) DO UPDATE SET value=excluded.value",
                       (json.dumps(state, separators=(",", ":")),))

    def cohort_state(self) -> dict[str, Any] | None:
        """The selector's state ``invite`` saved last (None: no cohort was ever selected here)."""
        row = self._db.execute("SELECT value FROM meta WHERE key='cohort'").fetchone()
        return None if row is None else dict(json.loads(row[0]))

    def invited(self, round_no: int) -> list[str] | None:
        """The clients invited to ``round_no``, sorted (None: the round had no cohort, everyone was invited)."""
        if self._db.execute("SELECT 1 FROM cohorts WHERE round=?", (round_no,)).fetchone() is None:
            return None
        return [r[0] for r in self._db.execute("SELECT client_id FROM invited WHERE round=? ORDER BY client_id", (round_no,))]

    def cohort_sizes(self) -> dict[int, int]:
        """Devices invited to each round that had a cohort (a read-only store older than cohorts: none)."""
        try:
            return dict(self._db.execute("SELECT round, invited FROM cohorts").fetchall())
        except sqlite3.OperationalError:
            return {}

    def add_bytes_down(self, round_no: int, nbytes: int) -> None:
        """Count an announcement of ``round_no``: what each device downloads for it (deferred, like receipts)."""
        with self._tx() as db:
            db.execute("UPDATE rounds SET bytes_down = bytes_down + ? WHERE round=?", (nbytes, round_no))
        self._deferred = True

    def rounds(self) -> list[dict[str, Any]]:
        """Every round; ``bytes_down`` is 0 in a store written before it was counted."""
        cols = ["round", "base_version", "opened", "deadline", "closed", "accepted", "extensions", "metrics", "bytes_down"]
        have = {row[1] for row in self._db.execute("PRAGMA table_info(rounds)")}  # a read-only store is never migrated
        select = ", ".join(col if col in have else f"0 AS {col}" for col in cols)
        rows = self._db.execute(f"SELECT {select} FROM rounds ORDER BY round").fetchall()
        out = [dict(zip(cols, row, strict=True)) for row in rows]
        for row in out:
            row["metrics"] = json.loads(row["metrics"])
        return out

    # -- accepted updates
    def is_accepted(self, update_id: str) -> bool:
        return self._db.execute("SELECT 1 FROM accepted WHERE update_id=?", (update_id,)).fetchone() is not None

    def spool(
        self, *, update_id: str, client_id: str, round_no: int, base_version: int, num_samples: int, payload: bytes, shard: int | None = None
    ) -> None:
        """Record an accepted update and its payload (deferred: ``sync()`` before its receipt)."""
        written = self._append(round_no, shard, payload)
        with self._tx() as db:
            self._insert_accepted(db, update_id, client_id, round_no, base_version, num_samples, shard, written)

    def admit(
        self, *, update_id: str, client_id: str, round_no: int, base_version: int, num_samples: int, payload: bytes,
        check: Callable[[Standing], None], shard: int | None = None, epoch: int | None = None,
    ) -> None:
        """Admit and record an update in one transaction, or raise what ``check`` raises (a Rejection).

        ``check`` sees the round's standing as of this transaction, which no other writer can
        change before it commits: two workers cannot both take the round's last place, nor both
        accept one update id. With ``epoch``, raise Superseded if another aggregator took over.
        Deferred: the payload is appended to this instance's segment (before the transaction, so
        outside the writers' lock) and the row committed, neither fsync'd: ``sync()`` before the receipt.
        """
        written = self._append(round_no, shard, payload)
        with self._tx() as db:
            standing, current_epoch = self._standing(db, round_no, update_id, client_id)
            if epoch is not None and current_epoch != str(epoch):
                raise Superseded(f"store {self.path} was taken over by another aggregator (epoch {current_epoch}, ours {epoch})")
            check(standing)
            self._insert_accepted(db, update_id, client_id, round_no, base_version, num_samples, shard, written)

    def standing(self, round_no: int, update_id: str, client_id: str) -> Standing:
        """The standing outside a transaction: a cheap early answer that ``admit`` confirms."""
        return self._standing(self._db, round_no, update_id, client_id)[0]

    @staticmethod
    def _standing(db: sqlite3.Connection, round_no: int, update_id: str, client_id: str) -> tuple[Standing, str | None]:
        """The round's standing for this update, and the store's epoch: one statement (the hot path
        runs it twice per update, and each SQLite call costs ~15 us here)."""
        closing, closed, update_seen, client_seen, accepted, epoch, invited = db.execute(_STANDING, {
            "round": round_no, "update": update_id, "client": client_id,
        }).fetchone()
        standing = Standing(
            update_seen=bool(update_seen), client_seen=bool(client_seen), accepted=accepted,
            closing=closing is None or bool(closing) or closed is not None, invited=bool(invited),
        )
        return standing, epoch

    def _insert_accepted(
        self, db: sqlite3.Connection, update_id: str, client_id: str, round_no: int, base_version: int, num_samples: int,
        shard: int | None, written: Written,
    ) -> None:
        """Insert the row (inside the caller's transaction) pointing at the bytes ``_append`` wrote."""
        db.execute(
            "INSERT INTO accepted (update_id, client_id, round, base_version, num_samples, received, bytes, shard, "
            'segment, "offset", digest) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)',
            (update_id, client_id, round_no, base_version, num_samples, time.time(), written.nbytes, shard,
             written.segment.name, written.offset, written.digest),
        )
        # From here on (the COMMIT may still fail, but then nothing is lost by skipping these bytes)
        # a row may refer to them: the next append goes after them.
        written.segment.offset = written.offset + written.nbytes
        self._deferred = True

    def spooled(self, round_no: int, *, shard: int | None = None) -> list[SpooledUpdate]:
        """The spooled updates of an open round (with ``shard``: only those that worker folded), by arrival.

        Each payload is read from its segment and checked against its length and digest; a row
        whose bytes are missing, short or different (only an OS crash before ``sync()`` does that:
        the update was never receipted) is deleted, so that its sender's resend is accepted again,
        with a warning. Bad bytes are never returned.
        """
        where = "round=? AND (payload IS NOT NULL OR segment IS NOT NULL)" + (" AND shard=?" if shard is not None else "")
        params = (round_no, shard) if shard is not None else (round_no,)
        columns = 'update_id, client_id, num_samples, payload, segment, "offset", bytes, digest'
        rows = self._db.execute(f"SELECT {columns} FROM accepted WHERE {where} ORDER BY received", params).fetchall()
        out: list[SpooledUpdate] = []
        with SegmentReader(self.spool_dir) as reader:
            for update_id, client_id, num_samples, legacy, segment, offset, nbytes, checksum in rows:
                if legacy is not None:  # written before segments: inside SQLite, whose commit is atomic
                    out.append(SpooledUpdate(update_id, client_id, num_samples, legacy))
                    continue
                payload = reader.read(segment, offset, nbytes)
                if payload is None:
                    problem = "missing"
                elif len(payload) != nbytes:
                    problem = f"short ({len(payload)} of {nbytes} bytes)"
                elif checksum is None or digest(payload) != checksum:
                    problem = "corrupt (digest mismatch)"
                else:
                    out.append(SpooledUpdate(update_id, client_id, num_samples, payload))
                    continue
                self._drop(update_id, client_id, round_no, segment, offset, problem)
        return out

    def _drop(self, update_id: str, client_id: str, round_no: int, segment: str, offset: int, problem: str) -> None:
        """Delete an accepted row whose spooled bytes were lost (unless the round was released meanwhile)."""
        if self.readonly:
            log.warning("spooled update %s of client %s in round %d is %s in %s (read-only store: row kept)",
                        update_id, client_id, round_no, problem, segment)
            return
        with self._durable() as db:
            deleted = db.execute(
                'DELETE FROM accepted WHERE update_id=? AND segment=? AND "offset"=?', (update_id, segment, offset)
            ).rowcount
        if deleted:
            log.warning(
                "dropped accepted update %s of client %s in round %d: its spooled bytes are %s in %s (an OS crash "
                "before the store's sync; it was never receipted, so its sender resends it)",
                update_id, client_id, round_no, problem, segment,
                extra={"round": round_no, "client": client_id, "update": update_id},
            )

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
    def record_receipts(self, rows: list[ReceiptRow]) -> None:
        """Record a batch of receipts in one transaction (deferred: ``sync()`` before publishing them)."""
        if not rows:
            return
        with self._tx() as db:
            db.executemany("INSERT INTO receipts (at, round, client_id, update_id, status, reason, bytes) VALUES (?, ?, ?, ?, ?, ?, ?)", rows)
        self._deferred = True

    def receipts(self) -> list[dict[str, Any]]:
        cols = ["at", "round", "client_id", "update_id", "status", "reason", "bytes"]
        rows = self._db.execute(f"SELECT {', '.join(cols)} FROM receipts ORDER BY id").fetchall()
        return [dict(zip(cols, row, strict=True)) for row in rows]

    def bytes_by_round(self) -> dict[int, int]:
        """Update bytes received per round (every receipt, accepted or not): the fleet's upload traffic."""
        return dict(self._db.execute("SELECT round, SUM(bytes) FROM receipts GROUP BY round").fetchall())

    def receipts_by_round(self) -> dict[int, int]:
        """Receipts sent per round (updates received, accepted or not): with ``bytes_by_round``, the mean upload per device."""
        return dict(self._db.execute("SELECT round, COUNT(*) FROM receipts GROUP BY round").fetchall())


def _insert_checkpoint(
    db: sqlite3.Connection, version: int, fingerprint: str, weights: Mapping[str, np.ndarray], strategy_state: Mapping[str, np.ndarray],
) -> None:
    """A checkpoint row (inside the caller's transaction) whose weights and strategy state are written in place,
    a step at a time (SQLite's incremental blob I/O), as ``pack_weights`` would encode them.

    Binding a 100 MB model as one parameter copied it whole, twice (msgpack, then SQLite's bind), while
    holding the GIL: 0.3 s and more in which the aggregator's event loop, on another thread, stood still.
    A blob write copies one step and lets other threads run between steps.
    """
    columns = {"weights": weight_pieces(weights), "strategy_state": weight_pieces(strategy_state)}
    sizes = [sum(len(piece) for piece in parts) for parts in columns.values()]
    db.execute("INSERT INTO checkpoints VALUES (?, ?, ?, zeroblob(?), zeroblob(?))", (version, time.time(), fingerprint, *sizes))
    for column, parts in columns.items():
        with db.blobopen("checkpoints", column, version) as blob:
            for step in steps(parts):
                blob.write(step)


class _Transaction:
    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    def __enter__(self) -> sqlite3.Connection:
        self._db.execute("BEGIN IMMEDIATE")
        return self._db

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self._db.execute("COMMIT" if exc_type is None else "ROLLBACK")
