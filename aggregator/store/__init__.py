"""The aggregator's store: the SQLite ledger and the spool's segment files (store.py), their
records (records.py), the segment files themselves (segments.py), the delta broadcaster's state
(broadcast.py), and the thread that owns a store in a running aggregator, so that no SQLite call
or fsync ever runs on its event loop (thread.py).
"""

from aggregator.store.records import BroadcastState, Checkpoint, ReceiptRow, SecureSession, SpooledUpdate, Standing
from aggregator.store.segments import digest
from aggregator.store.store import BUSY_TIMEOUT, Store
from aggregator.store.thread import InlineStore, StoreAccess, StoreThread, call, run

__all__ = [
    "BUSY_TIMEOUT", "BroadcastState", "Checkpoint", "InlineStore", "ReceiptRow", "SecureSession", "SpooledUpdate", "Standing", "Store",
    "StoreAccess", "StoreThread", "call", "digest", "run",
]
