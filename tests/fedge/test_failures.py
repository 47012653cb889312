"""fedge/failures.py: which errors are a store that cannot be used, and the line the CLI prints for each.

The SQLite errors are real ones, made by SQLite on real files; tests/fedge/test_store_failures.py
runs a whole aggregator process into a read-only and a full store.
"""

from __future__ import annotations

import errno
import sqlite3
from pathlib import Path

import pytest

from fedge.cli import build_parser
from fedge.failures import EXIT_STORAGE, storage_failure


def raised(action) -> BaseException:  # type: ignore[no-untyped-def]
    try:
        action()
    except BaseException as exc:  # whatever it raised is what the test looks at
        return exc
    raise AssertionError("nothing was raised")


def full(tmp_path: Path) -> sqlite3.Error:
    db = sqlite3.connect(tmp_path / "full.sqlite")
    db.execute("PRAGMA max_page_count = 2")  # SQLite's own "disk full" at two pages
    return raised(lambda: db.execute("CREATE TABLE t (x)").execute("INSERT INTO t VALUES (zeroblob(100000))"))  # type: ignore[return-value]


def read_only(tmp_path: Path) -> sqlite3.Error:
    path = tmp_path / "ro.sqlite"
    sqlite3.connect(path).execute("CREATE TABLE t (x)").connection.commit()
    db = sqlite3.connect(f"{path.as_uri()}?mode=ro", uri=True)
    return raised(lambda: db.execute("INSERT INTO t VALUES (1)"))  # type: ignore[return-value]


def cannot_open(tmp_path: Path) -> sqlite3.Error:
    return raised(lambda: sqlite3.connect(tmp_path / "missing-folder" / "store.sqlite"))  # type: ignore[return-value]


def not_a_store(tmp_path: Path) -> sqlite3.Error:
    path = tmp_path / "notes.txt"
    path.write_bytes(b"these are not the pages you are looking for" * 100)
    return raised(lambda: sqlite3.connect(path).execute("SELECT * FROM sqlite_master"))  # type: ignore[return-value]


def held(tmp_path: Path) -> sqlite3.Error:
    path = tmp_path / "held.sqlite"
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("CREATE TABLE t (x)")
    holder.execute("BEGIN EXCLUSIVE")
    other = sqlite3.connect(path, timeout=0)
    return raised(lambda: other.execute("SELECT * FROM t"))  # type: ignore[return-value]


@pytest.mark.parametrize("make, what, todo", [
    (full, "its disk is full", "free space"),
    (read_only, "read-only", "writable"),
    (cannot_open, "read-only", "writable"),
    (not_a_store, "not a readable fedge store", "backup"),
    (held, "another process holds it", "one aggregator per store"),
])
def test_each_sqlite_failure_says_what_happened_to_which_store_and_what_to_do(tmp_path, make, what, todo):
    error = make(tmp_path)
    assert isinstance(error, sqlite3.Error)
    failure = storage_failure(error, tmp_path / "agg.sqlite")
    assert failure is not None
    line = str(failure)
    assert line.startswith(f"the store {tmp_path / 'agg.sqlite'} cannot be used, ") and what in line and todo in line
    assert f"SQLite: {error}" in line and "\n" not in line


def test_the_disk_errors_of_the_system_name_their_own_file():
    failure = storage_failure(OSError(errno.ENOSPC, "No space left on device", "/var/lib/fedge/store.sqlite-wal"), "/elsewhere")
    assert failure is not None and failure.path == "/var/lib/fedge/store.sqlite-wal" and "full" in failure.what
    failure = storage_failure(OSError(errno.EROFS, "Read-only file system"), "/var/lib/fedge/store.sqlite")
    assert failure is not None and failure.path == "/var/lib/fedge/store.sqlite" and "read-only" in failure.what
    assert storage_failure(OSError(errno.EACCES, "Permission denied", "/etc/fedge/ca.pem")) is None  # a setting to fix: exit 2
    assert storage_failure(ValueError("a bug")) is None


def test_a_store_failure_is_found_in_a_group_or_as_a_cause_but_not_in_an_unrelated_context(tmp_path):
    error = full(tmp_path)
    assert storage_failure(ExceptionGroup("tasks failed", [ValueError("other"), error])) is not None
    try:
        raise RuntimeError("the ingest stopped") from error
    except RuntimeError as wrapped:
        assert storage_failure(wrapped) is not None
    try:
        try:
            raise error
        except sqlite3.Error:
            raise TypeError("a bug in the handler")  # noqa: B904 - the point: only an implicit context
    except TypeError as bug:
        assert storage_failure(bug) is None  # a bug while handling it stays a bug


def test_the_exit_codes_are_in_the_help():
    help_text = build_parser().format_help()
    assert f"{EXIT_STORAGE} a store cannot be used" in " ".join(help_text.split())
