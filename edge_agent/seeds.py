"""Per-(device, round) seeds, kept free of torch so the waiting agent can use them."""

from __future__ import annotations

import zlib


def training_seed(seed: int, client_id: str, round_no: int) -> int:
    """A stable per-(device, round) seed: reruns reproduce, devices and rounds differ."""
    return zlib.crc32(f"{seed}:{client_id}:{round_no}".encode())
