"""The on-disk outbox: an encoded update stays here from the moment it is trained until its receipt.

One file per update, named ``r<round>-v<base_version>-<update_id>.update``, written atomically,
so a killed or rebooted device republishes exactly what it had trained (the aggregator dedupes by
update id) and a network outage loses no work.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from edge_agent.files import atomic_write

_NAME = re.compile(r"^r(\d+)-v(\d+)-([A-Za-z0-9_-]+)\.update$")
_UPDATE_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


@dataclass(frozen=True)
class PendingUpdate:
    update_id: str
    round: int
    base_version: int
    path: Path

    def payload(self) -> bytes:
        return self.path.read_bytes()


class Outbox:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)

    def put(self, *, update_id: str, round_no: int, base_version: int, payload: bytes) -> PendingUpdate:
        if not _UPDATE_ID.match(update_id) or round_no < 0 or base_version < 0:
            # anything else could not be listed again (or would escape the folder): refuse it now
            raise ValueError(f"outbox: bad update id {update_id!r} or round/version {round_no}/{base_version}")
        path = self.directory / f"r{round_no}-v{base_version}-{update_id}.update"
        atomic_write(path, payload)
        return PendingUpdate(update_id, round_no, base_version, path)

    def pending(self) -> list[PendingUpdate]:
        """Everything not yet answered by a receipt, oldest round first."""
        found = []
        for path in self.directory.iterdir():
            match = _NAME.match(path.name)
            if match:
                found.append(PendingUpdate(match.group(3), int(match.group(1)), int(match.group(2)), path))
        return sorted(found, key=lambda p: (p.round, p.path.stat().st_mtime))

    def remove(self, update_id: str) -> bool:
        removed = False
        for pending in self.pending():
            if pending.update_id == update_id:
                pending.path.unlink(missing_ok=True)
                removed = True
        return removed

    def drop_before(self, round_no: int) -> list[str]:
        """Forget updates of rounds that are over (their round will never accept them)."""
        return [pending.update_id for pending in self.drop(lambda pending: pending.round < round_no)]

    def drop(self, which: Callable[[PendingUpdate], bool]) -> list[PendingUpdate]:
        """Forget the updates ``which`` selects; returns them (their files are gone)."""
        dropped = []
        for pending in self.pending():
            if which(pending):
                pending.path.unlink(missing_ok=True)
                dropped.append(pending)
        return dropped
