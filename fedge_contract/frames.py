"""Length-prefixed msgpack frames over a pipe, between a fedge program and its child processes.

One frame is an 8-byte big-endian length and a msgpack map. The agent's training child
(edge_agent/train_worker.py) and the aggregator's ingest workers (aggregator/worker.py) both
speak it on their stdin/stdout. Only plain values cross: never pickle, so a child that was
tampered with cannot make its parent run code.
"""

from __future__ import annotations

import asyncio
import struct
from typing import Any

import msgpack

HEADER = struct.Struct(">Q")
MAX_FRAME = 2**34  # 16 GiB: a bound, not an expectation


def pack_frame(message: dict[str, Any]) -> bytes:
    body: bytes = msgpack.packb(message, use_bin_type=True)
    return HEADER.pack(len(body)) + body


async def read_frame(stream: asyncio.StreamReader, max_frame: int = MAX_FRAME) -> dict[str, Any] | None:
    """The next frame, or None at end of stream (the other side exited or closed the pipe)."""
    try:
        (length,) = HEADER.unpack(await stream.readexactly(HEADER.size))
        if length > max_frame:
            return None
        message = msgpack.unpackb(await stream.readexactly(length), raw=False)
    except asyncio.IncompleteReadError:
        return None
    return message if isinstance(message, dict) else None
