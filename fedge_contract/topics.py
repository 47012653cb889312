"""MQTT topic names of one fleet (DESIGN.md, Topics)."""

from __future__ import annotations

import re
from dataclasses import dataclass

_NAME = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


def check_name(kind: str, value: str) -> str:
    """Refuse names that would escape their topic level (``/``, ``+``, ``#``) or be unreadable."""
    if not _NAME.match(value):
        raise ValueError(
            f"{kind} {value!r} must be 1-64 characters of letters, digits, '.', '_' or '-'"
        )
    return value


@dataclass(frozen=True)
class Topics:
    """The topics of fleet ``fleet``: ``fl/<fleet>/...``."""

    fleet: str = "default"

    def __post_init__(self) -> None:
        check_name("fleet", self.fleet)

    @property
    def prefix(self) -> str:
        return f"fl/{self.fleet}"

    @property
    def global_model(self) -> str:
        return f"{self.prefix}/global"

    @property
    def status(self) -> str:
        return f"{self.prefix}/status"

    @property
    def all_updates(self) -> str:
        return f"{self.prefix}/updates/+"

    @property
    def all_presence(self) -> str:
        return f"{self.prefix}/presence/+"

    def update(self, client_id: str) -> str:
        return f"{self.prefix}/updates/{check_name('client id', client_id)}"

    def receipt(self, client_id: str) -> str:
        return f"{self.prefix}/receipts/{check_name('client id', client_id)}"

    def presence(self, client_id: str) -> str:
        return f"{self.prefix}/presence/{check_name('client id', client_id)}"

    def client_of(self, topic: str) -> str | None:
        """The client id in an ``updates/<id>`` or ``presence/<id>`` topic of this fleet, else None."""
        parts = topic.split("/")
        if len(parts) == 4 and parts[0] == "fl" and parts[1] == self.fleet:
            if parts[2] in ("updates", "presence", "receipts") and _NAME.match(parts[3]):
                return parts[3]
        return None
