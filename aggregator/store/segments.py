"""The spool's payload files: append-only segments, read back verified, synced off the loop.

A segment ``r{round}-{shard|a}-{token}.seg`` holds the raw payloads of one round's accepted
updates, appended by exactly one Store instance (``token`` is random per instance), which tracks
its own offset. A ledger row names its segment, offset, length and CRC-32 (``digest``).
"""

from __future__ import annotations

import contextlib
import os
import re
import zlib
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Self

SEGMENT_NAME = re.compile(r"r(-?\d+)-(-?\d+|a)-([0-9a-f]+)\.seg")


def digest(payload: bytes) -> bytes:
    """The checksum a spooled payload is verified against when it is read back.

    It guards against torn or missing bytes after an OS crash on our own disk, not against an
    adversary, so CRC-32 (0.25 ms per MB here) rather than a cryptographic hash (blake2b: 1.1 ms
    per MB, the largest single cost of spooling a 1 MB update; bench/spool.py).
    """
    return zlib.crc32(payload).to_bytes(4, "big")




@dataclass
class Segment:
    """A segment file this Store instance writes (its only writer): the next append goes at ``offset``."""

    round: int
    name: str
    fd: int
    offset: int


@dataclass(frozen=True)
class Written:
    """Where ``Store._append`` put a payload: the row to commit refers to it."""

    segment: Segment
    offset: int
    nbytes: int
    digest: bytes



@dataclass
class SyncPlan:
    """What one sync of the files makes durable (``sync`` runs it at once, ``sync_soon`` on its thread); it closes ``files``."""

    files: list[int]  # duplicated descriptors of the segments written since the last sync
    folders: list[Path]  # folders whose new entries must be durable
    wal: Path | None  # the WAL, when rows were committed since the last sync
    database: Path

    def run(self) -> None:
        try:
            for fd in self.files:
                os.fdatasync(fd)
        finally:
            for fd in self.files:
                os.close(fd)
        for folder in self.folders:
            fsync_folder(folder)
        if self.wal is not None:
            try:
                fd = os.open(self.wal, os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                fd = os.open(self.database, os.O_RDONLY | os.O_CLOEXEC)
            try:
                os.fdatasync(fd)
            finally:
                os.close(fd)


def fsync_folder(folder: Path) -> None:
    """Make the folder's entries (files created or renamed in it) durable."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class SegmentReader:
    """Reads payloads back from segment files, each opened once per ``spooled`` call."""

    def __init__(self, folder: Path) -> None:
        self._folder = folder
        self._fds: dict[str, int | None] = {}

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        for fd in self._fds.values():
            if fd is not None:
                os.close(fd)

    def read(self, name: str, offset: int | None, nbytes: int) -> bytes | None:
        """Up to ``nbytes`` at ``offset`` (fewer at the end of the file); None if the file is missing."""
        if name not in self._fds:
            fd = None
            if SEGMENT_NAME.fullmatch(name):  # a name from the database, never a path
                with contextlib.suppress(FileNotFoundError):
                    fd = os.open(self._folder / name, os.O_RDONLY | os.O_CLOEXEC)
            self._fds[name] = fd
        fd = self._fds[name]
        if fd is None or offset is None:
            return None
        chunks, at, left = [], offset, nbytes
        while left > 0:
            chunk = os.pread(fd, left, at)
            if not chunk:
                break
            chunks.append(chunk)
            at, left = at + len(chunk), left - len(chunk)
        return b"".join(chunks)
