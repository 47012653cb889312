"""What ``fedge`` exits with, and the one line it prints when a store cannot be used.

Exit codes (also in ``fedge --help`` and the README)::

    0    done
    1    a bug: the traceback says where
    2    bad flags or settings, or another error the message says how to fix
    74   a store cannot be used: its disk is full or failing, it or its folder is read-only, it is
         not a fedge store, or another process holds it (sysexits.h EX_IOERR). The aggregator
         resumes from the store once that is fixed: its systemd unit restarts it.
    130  stopped by SIGINT or SIGTERM

A store failure reaches the CLI as an ``sqlite3.Error`` (SQLite reports a full disk, a read-only
file and a corrupt one itself) or as an ``OSError`` of the disk (ENOSPC, EDQUOT, EFBIG, EROFS,
EIO), possibly inside an exception group or as the cause of another error. Before issue 19 it
ended the aggregator with a raw traceback and exit code 1, like a bug.
"""

from __future__ import annotations

import errno
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

EXIT_USAGE = 2
EXIT_STORAGE = 74  # sysexits.h EX_IOERR
EXIT_INTERRUPTED = 130

EXIT_CODES_HELP = (
    "exit codes: 0 done; 1 a bug (with its traceback); 2 bad flags or settings, or an error the message says how to fix; "
    "74 a store cannot be used (disk full or failing, read-only, not a fedge store, held by another process); "
    "130 stopped by SIGINT/SIGTERM"
)

# SQLite's primary result codes (the low byte of an extended code), by what the user must do.
_SQLITE_FULL = {13}  # SQLITE_FULL
_SQLITE_READ_ONLY = {3, 8, 14, 23}  # SQLITE_PERM, SQLITE_READONLY, SQLITE_CANTOPEN, SQLITE_AUTH
_SQLITE_IO = {10}  # SQLITE_IOERR: also a write past a quota or a file-size limit (SQLite says "full" only for ENOSPC)
_SQLITE_CORRUPT = {11, 26}  # SQLITE_CORRUPT, SQLITE_NOTADB
_SQLITE_HELD = {5, 6}  # SQLITE_BUSY, SQLITE_LOCKED
_OS_FULL = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
_OS_READ_ONLY = {errno.EROFS}
_OS_IO = {errno.EIO}

_FULL = "its disk is full", "free space on that disk, then start the aggregator again (it resumes from the store)"
_READ_ONLY = ("it or its folder is read-only",
              "make both writable by the user the aggregator runs as (SQLite writes its journal beside the file), "
              "or give --store a writable path")
_IO = ("its disk failed a read or a write: it is full, over a quota or file-size limit, or failing",
       "free space on that disk or fix it (df, dmesg), then start the aggregator again (it resumes from the store)")
_CORRUPT = "it is not a readable fedge store", "restore it from a backup, or give --store a new path"
_HELD = "another process holds it", "run one aggregator per store (check for one still running)"


@dataclass(frozen=True)
class StorageFailure:
    """A store that cannot be used: which file, what happened, what to do."""

    path: str
    what: str
    todo: str
    detail: str

    def __str__(self) -> str:
        return f"the store {self.path} cannot be used, {self.what} ({self.detail}); {self.todo}"


def storage_failure(error: BaseException, store: Path | str | None = None) -> StorageFailure | None:
    """The store failure in ``error`` (itself, a member of its group, its cause), or None if it holds none.

    ``store``: the command's store (``--store``), named when the error does not name its file.
    """
    for found in _causes(error):
        if isinstance(found, sqlite3.Error):
            kind = _sqlite_kind(found)
            return StorageFailure(str(store or "(its SQLite file)"), *kind, detail=f"SQLite: {_detail(found)}")
        if isinstance(found, OSError) and found.errno is not None:
            os_kind = _FULL if found.errno in _OS_FULL else _READ_ONLY if found.errno in _OS_READ_ONLY else _IO if found.errno in _OS_IO else None
            if os_kind is not None:
                return StorageFailure(str(found.filename or store or "(a file it writes)"), *os_kind, detail=f"the system: {_detail(found)}")
    return None


def _sqlite_kind(error: sqlite3.Error) -> tuple[str, str]:
    code = getattr(error, "sqlite_errorcode", None)
    primary = code & 0xFF if isinstance(code, int) else None
    for codes, kind in ((_SQLITE_FULL, _FULL), (_SQLITE_READ_ONLY, _READ_ONLY), (_SQLITE_IO, _IO), (_SQLITE_CORRUPT, _CORRUPT),
                        (_SQLITE_HELD, _HELD)):
        if primary in codes:
            return kind
    return "SQLite failed on it", "see the error; the store is kept as it is"


def _detail(error: BaseException) -> str:
    return " ".join(str(error.strerror if isinstance(error, OSError) and error.strerror else error).split()) or type(error).__name__


def _causes(error: BaseException) -> Iterator[BaseException]:
    """``error``, the members of its exception groups, and their ``raise ... from`` causes, depth first, each once."""
    seen: set[int] = set()
    stack = [error]
    while stack:
        current = stack.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        if current.__cause__ is not None:  # raise ... from: not __context__, which may be unrelated
            stack.append(current.__cause__)
        if isinstance(current, BaseExceptionGroup):
            stack.extend(reversed(current.exceptions))
