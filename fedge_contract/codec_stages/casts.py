"""Value stages that only change the float format: f32 (identity), f16, bf16."""

from __future__ import annotations

import numpy as np

from fedge_contract.errors import CodecError

F16_MAX = float(np.finfo(np.float16).max)
BF16_MAX = float(np.array([0x7F7F0000], dtype="<u4").view("<f4")[0])  # largest finite bfloat16


def _no_arg(name: str, arg: str) -> None:
    if arg:
        raise CodecError(f"stage {name!r} takes no argument")


class F32:
    """No value stage: raw little-endian float32."""

    text = ""
    wire_dtype = "f32"
    stochastic = False

    def nbytes(self, m: int) -> int:
        return 4 * m

    def encode(self, values: np.ndarray, rng: np.random.Generator | None) -> bytes:
        return values.astype("<f4", copy=False).tobytes()

    def decode(self, data: memoryview, m: int, where: str) -> np.ndarray:
        return np.frombuffer(data, dtype="<f4", count=m).astype(np.float32)


class F16:
    text = "f16"
    wire_dtype = "f16"
    stochastic = False

    def __init__(self, arg: str = "") -> None:
        _no_arg(self.text, arg)

    def nbytes(self, m: int) -> int:
        return 2 * m

    def encode(self, values: np.ndarray, rng: np.random.Generator | None) -> bytes:
        # Saturate instead of overflowing to inf: the receiver rejects inf, and a delta that
        # large is already absurd; saturation keeps the update usable and bounded.
        saturated: np.ndarray = np.clip(values, -F16_MAX, F16_MAX)
        return saturated.astype("<f2").tobytes()

    def decode(self, data: memoryview, m: int, where: str) -> np.ndarray:
        return np.frombuffer(data, dtype="<f2", count=m).astype(np.float32)


class BF16:
    text = "bf16"
    wire_dtype = "bf16"
    stochastic = False

    def __init__(self, arg: str = "") -> None:
        _no_arg(self.text, arg)

    def nbytes(self, m: int) -> int:
        return 2 * m

    def encode(self, values: np.ndarray, rng: np.random.Generator | None) -> bytes:
        # saturate like f16 rather than round the largest floats up to inf
        values = np.clip(values, -BF16_MAX, BF16_MAX)
        bits = np.ascontiguousarray(values, dtype="<f4").view("<u4").astype(np.uint64)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16  # round to nearest, ties to even
        return rounded.astype("<u2").tobytes()

    def decode(self, data: memoryview, m: int, where: str) -> np.ndarray:
        return (np.frombuffer(data, dtype="<u2", count=m).astype("<u4") << 16).view("<f4").astype(np.float32)
