"""What an agent remembers across restarts besides its outbox."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from edge_agent.files import atomic_write


@dataclass
class AgentState:
    trained_version: int = -1  # newest global version this device trained on and queued an update for
    fingerprint: str = ""  # architecture of the models seen
    dropped_updates: int = 0  # updates dropped unanswered, ever (their round was over): shown in presence

    @classmethod
    def load(cls, path: Path) -> AgentState:
        if not path.exists():
            return cls()
        try:
            data = json.loads(path.read_text())
            return cls(trained_version=int(data["trained_version"]), fingerprint=str(data.get("fingerprint", "")),
                       dropped_updates=max(0, int(data.get("dropped_updates", 0))))
        except (ValueError, KeyError, TypeError, OverflowError, RecursionError):
            # A corrupt state file costs at most one retraining: never refuse to start over it.
            return cls()

    def save(self, path: Path) -> None:
        atomic_write(path, json.dumps(asdict(self)).encode())
