"""The ring Z_(2^bits) that masked inputs live in, stored in the smallest unsigned numpy type that fits.

A power-of-two modulus makes the masks exact and cheap: numpy's unsigned arithmetic wraps
modulo 2^16, 2^32 or 2^64 by itself, and reducing to fewer bits is one ``&``. A uniform
keystream word reduced that way stays uniform, so masks carry no modular bias.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fedge_contract.secagg.errors import ParameterError

MIN_BITS = 8
MAX_BITS = 64


@dataclass(frozen=True)
class Ring:
    bits: int = 32

    def __post_init__(self) -> None:
        if not MIN_BITS <= self.bits <= MAX_BITS:
            raise ParameterError(f"ring bits must be {MIN_BITS}-{MAX_BITS}, got {self.bits}")

    @property
    def dtype(self) -> np.dtype[np.unsignedinteger]:
        width = next(w for w in (8, 16, 32, 64) if self.bits <= w)
        return np.dtype(f"<u{width // 8}")

    @property
    def width(self) -> int:
        """Bytes per element on the wire."""
        return self.dtype.itemsize

    @property
    def modulus(self) -> int:
        return 1 << self.bits

    def reduce(self, values: np.ndarray) -> np.ndarray:
        """``values`` (of the ring's dtype) modulo 2^bits: a no-op when bits fill the dtype."""
        if self.bits == 8 * self.width:
            return values
        reduced: np.ndarray = values & self.dtype.type(self.modulus - 1)
        return reduced

    def zeros(self, length: int) -> np.ndarray:
        return np.zeros(length, dtype=self.dtype)

    def add(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return self.reduce(a + b)

    def sub(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return self.reduce(a - b)

    def contains(self, values: np.ndarray) -> bool:
        """Whether ``values`` are elements of this ring: its dtype, nothing at or above 2^bits."""
        if values.dtype != self.dtype or values.ndim != 1:
            return False
        return self.bits == 8 * self.width or values.size == 0 or int(values.max()) < self.modulus

    def from_signed(self, values: np.ndarray) -> np.ndarray:
        """Integers (any sign, |v| < 2^63) as ring elements: two's complement, reduced."""
        return self.reduce(values.astype(np.int64).view(np.uint64).astype(self.dtype))

    def to_signed(self, values: np.ndarray) -> np.ndarray:
        """Ring elements as int64 in [-2^(bits-1), 2^(bits-1)): the centred lift a sum is read back with."""
        wide = values.astype(np.uint64)
        if self.bits == 64:
            return wide.view(np.int64)
        signed = wide.astype(np.int64)
        return np.where(signed >= (1 << (self.bits - 1)), signed - (1 << self.bits), signed)

    def to_bytes(self, values: np.ndarray) -> bytes:
        return np.ascontiguousarray(values, dtype=self.dtype).tobytes()

    def from_bytes(self, data: bytes, length: int) -> np.ndarray:
        """``length`` elements from ``data`` (copied, writable); ParameterError if it does not hold exactly that."""
        if len(data) != length * self.width:
            raise ParameterError(f"{len(data)} bytes do not hold {length} elements of {self.width} bytes")
        values = np.frombuffer(data, dtype=self.dtype).copy()
        if not self.contains(values):
            raise ParameterError(f"values at or above 2^{self.bits}")
        return values
