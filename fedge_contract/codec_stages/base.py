"""What each class of stage promises to the chain (see fedge_contract.codecs for the layout)."""

from __future__ import annotations

from typing import Protocol

import numpy as np


class SparsifyStage(Protocol):
    """Chooses which coordinates travel; ``count(n)`` of them, fixed by ``n`` alone."""

    text: str

    def count(self, n: int) -> int: ...

    def index_bounds(self, n: int) -> tuple[int, int]:
        """Fewest and most bytes of the position section, from ``n`` alone (equal for a fixed-size coding)."""
        ...

    def select(self, values: np.ndarray) -> np.ndarray:
        """Sorted int64 positions of the coordinates to send (``values`` is 1-D float32)."""
        ...

    def encode_indices(self, indices: np.ndarray, n: int) -> bytes: ...

    def decode_indices(self, data: memoryview, n: int, where: str) -> np.ndarray:
        """Validated (in range, strictly increasing) int64 positions, or DecodeError."""
        ...


class ValueStage(Protocol):
    """Turns ``m`` float32 values into bytes and back; ``nbytes(m)`` is exact."""

    text: str
    wire_dtype: str
    stochastic: bool  # uses the rng passed to encode

    def nbytes(self, m: int) -> int: ...

    def encode(self, values: np.ndarray, rng: np.random.Generator | None) -> bytes: ...

    def decode(self, data: memoryview, m: int, where: str) -> np.ndarray:
        """1-D float32 of ``m`` values; malformed stored values are a DecodeError."""
        ...


class LosslessStage(Protocol):
    """A lossless compressor over the stage bytes; decompression never yields more than ``max_size``."""

    text: str

    def compress(self, data: bytes) -> bytes: ...

    def decompress(self, data: bytes, max_size: int) -> bytes: ...
