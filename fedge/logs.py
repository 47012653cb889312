"""Logging set-up shared by every fedge command: one line per event."""

from __future__ import annotations

import logging
import sys
from pathlib import Path


def setup_logging(level: str = "info", file: Path | None = None) -> None:
    handler: logging.Handler = logging.FileHandler(file) if file else logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # paho logs every packet at DEBUG through aiomqtt's logger; keep it to warnings unless asked
    if level.lower() != "debug":
        logging.getLogger("mqtt").setLevel(logging.WARNING)
