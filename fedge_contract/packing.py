"""msgpack for messages that carry whole models, without holding the GIL for a whole copy.

``msgpack.packb`` copies every byte of a message in one C call that holds the GIL: for a 100 MB
model that was 130-170 ms here during which no other thread of the process ran, so an event loop
sharing the process with the thread that packed it (the aggregator's) stalled as long. ``pieces``
is the same encoding split into the msgpack framing and the large binary values themselves (as
views, not copies); ``assemble`` copies them into one buffer ``STEP`` bytes at a time, and a writer
that streams (SQLite's incremental blob I/O) can take the pieces directly. Between two steps the
interpreter may switch threads, so the loop waits at most one step (~0.3 ms per MiB here).

The bytes are exactly ``msgpack.packb(obj, use_bin_type=True)``'s (tested), so every decoder reads
them as before.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import msgpack

__all__ = ["STEP", "Piece", "assemble", "pieces", "steps"]

STEP = 1 << 20  # bytes copied at a time
Piece = bytes | memoryview


def pieces(obj: Any) -> list[Piece]:
    """``obj``'s msgpack encoding as consecutive pieces; binary values larger than STEP are views of themselves."""
    packer = msgpack.Packer(use_bin_type=True, autoreset=True)
    out: list[Piece] = []

    def walk(value: Any) -> None:
        if isinstance(value, Mapping):
            out.append(packer.pack_map_header(len(value)))
            for key, item in value.items():
                walk(key)
                walk(item)
        elif isinstance(value, Sequence) and not isinstance(value, (str, bytes, bytearray, memoryview)):
            out.append(packer.pack_array_header(len(value)))
            for item in value:
                walk(item)
        elif isinstance(value, (bytes, bytearray, memoryview)) and len(value) > STEP:
            view = memoryview(value).cast("B")
            out.append(_bin32_header(len(view)))
            out.append(view)
        else:
            out.append(packer.pack(value))

    walk(obj)
    return out


def _bin32_header(size: int) -> bytes:
    """msgpack's header of a binary value of ``size`` bytes, 64 KiB <= size < 4 GiB (bin 32: 0xc6, big-endian length).
    msgpack-python's Packer has no method for it; ``packb`` writes exactly this for such a value."""
    return b"\xc6" + size.to_bytes(4, "big")


def steps(parts: Sequence[Piece]) -> Iterator[Piece]:
    """The pieces cut into at most STEP bytes each (views: nothing is copied)."""
    for part in parts:
        if len(part) <= STEP:
            yield part
            continue
        view = memoryview(part)
        for start in range(0, len(view), STEP):
            yield view[start : start + STEP]


def assemble(parts: Sequence[Piece]) -> bytearray:
    """One buffer holding ``parts`` in order, copied STEP bytes at a time."""
    out = bytearray(sum(len(part) for part in parts))
    at = 0
    for step in steps(parts):
        out[at : at + len(step)] = step
        at += len(step)
    return out
