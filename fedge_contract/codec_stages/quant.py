"""q8 and q4: per-block scale, unbiased stochastic rounding.

Values are cut into blocks of ``block`` consecutive elements (default 256: one float32 scale per
256 values costs 1.6% over q8, and a block is small enough that one outlier coarsens only its
own neighbours). Each block's scale is ``max|x| / L`` (L = 127 for q8, 7 for q4) and every value
becomes ``floor(x / scale + u)`` with a dither ``u`` uniform in (0, 1): the expected decoded
value is ``x`` itself, so the quantisation error averages out across devices and rounds
instead of accumulating as a bias. The dither has 16 bits (``(r + 0.5) / 65536``, r uniform
u16: generating it is ~8x faster than float32 uniforms), which with float32 arithmetic keeps the
bias below 2**-16 of one quantisation step.

Stored layout (before the lossless stage): ``ceil(m / block)`` little-endian float32 scales,
then the levels: q8 one int8 per value in [-127, 127]; q4 two values per byte, value ``i`` in
the low nibble of byte ``i // 2`` when ``i`` is even, the high one when odd, each nibble
``level + 8`` in [1, 15] (an odd count pads with the nibble 8, i.e. level 0). -128, the nibble 0
and a non-8 pad are malformed; a negative scale is malformed, a non-finite one NON_FINITE.
"""

from __future__ import annotations

import numpy as np

from fedge_contract.errors import CodecError, DecodeError, Reason

DEFAULT_BLOCK = 256
MAX_BLOCK = 1 << 20
_DITHER_BITS = 16


def _block_arg(name: str, arg: str) -> int:
    if not arg:
        return DEFAULT_BLOCK
    if not arg.isdigit() or len(arg) > 8:
        raise CodecError(f"{name} block must be a positive integer, got {arg!r}")
    block = int(arg)
    if not 1 <= block <= MAX_BLOCK:
        raise CodecError(f"{name} block must be 1..{MAX_BLOCK}, got {block}")
    return block


def _levels(values: np.ndarray, block: int, top: int, rng: np.random.Generator | None) -> tuple[np.ndarray, np.ndarray]:
    """(scales float32 [nb], levels int8 [m]) with unbiased stochastic rounding."""
    m = values.size
    nb = -(-m // block)
    if nb * block != m:
        padded = np.zeros(nb * block, np.float32)
        padded[:m] = values
    else:
        padded = values
    blocks = padded.reshape(nb, block)
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        absmax = np.maximum(blocks.max(axis=1, initial=0.0), -blocks.min(axis=1, initial=0.0))
        scales = (absmax / np.float32(top)).astype(np.float32)
        # A subnormal scale has too few bits: 1/scale overflows and the rebuilt block can exceed its
        # largest input. Such a block (|x| < 1.5e-36) is sent as zeros; NaN and Inf stay as they are.
        scales[scales < np.finfo(np.float32).tiny] = 0
        # A non-finite scale (NaN/Inf in the input) travels as is: the receiver rejects the
        # tensor as NON_FINITE, exactly as it would reject the raw float32 values.
        inv = np.where(scales > 0, np.float32(1.0) / np.where(scales > 0, scales, 1), 0).astype(np.float32)
        y = blocks * inv[:, None]
        rng = rng if rng is not None else np.random.default_rng()
        dither = rng.integers(0, 1 << _DITHER_BITS, size=y.shape, dtype=np.uint16).astype(np.float32)
        dither *= np.float32(2.0**-_DITHER_BITS)
        dither += np.float32(2.0 ** -(_DITHER_BITS + 1))
        y += dither
        np.floor(y, out=y)
        np.clip(y, -top, top, out=y)  # float32 rounding of y + u can touch top + 1
        levels = y.astype(np.int8).reshape(-1)[:m]
    return scales, levels


def _scales(data: memoryview, nb: int, where: str) -> np.ndarray:
    scales = np.frombuffer(data, dtype="<f4", count=nb)
    if not np.isfinite(scales).all():
        raise DecodeError(Reason.NON_FINITE, f"{where}: a block scale is NaN or Inf")
    if (scales < 0).any():
        raise DecodeError(Reason.BAD_TENSOR, f"{where}: a block scale is negative")
    return scales


def _apply_scales(levels: np.ndarray, scales: np.ndarray, block: int, m: int) -> np.ndarray:
    nb = scales.size
    out = np.empty(nb * block, np.float32)
    out[:m] = levels
    out[m:] = 0
    blocks = out.reshape(nb, block)
    blocks *= scales[:, None]
    return out[:m]


class Q8:
    wire_dtype = "i8"
    stochastic = True
    top = 127

    def __init__(self, arg: str = "") -> None:
        self.block = _block_arg("q8", arg)
        self.text = "q8" if not arg else f"q8:{self.block}"

    def nbytes(self, m: int) -> int:
        return 4 * -(-m // self.block) + m

    def encode(self, values: np.ndarray, rng: np.random.Generator | None) -> bytes:
        scales, levels = _levels(values, self.block, self.top, rng)
        return scales.astype("<f4").tobytes() + levels.tobytes()

    def decode(self, data: memoryview, m: int, where: str) -> np.ndarray:
        nb = -(-m // self.block)
        scales = _scales(data, nb, where)
        levels = np.frombuffer(data, dtype=np.int8, count=m, offset=4 * nb)
        if m and levels.min() < -self.top:
            raise DecodeError(Reason.BAD_TENSOR, f"{where}: q8 level -128 is outside [-127, 127]")
        return _apply_scales(levels, scales, self.block, m)


class Q4:
    wire_dtype = "u8"  # two 4-bit levels per byte
    stochastic = True
    top = 7

    def __init__(self, arg: str = "") -> None:
        self.block = _block_arg("q4", arg)
        self.text = "q4" if not arg else f"q4:{self.block}"

    def nbytes(self, m: int) -> int:
        return 4 * -(-m // self.block) + (m + 1) // 2

    def encode(self, values: np.ndarray, rng: np.random.Generator | None) -> bytes:
        scales, levels = _levels(values, self.block, self.top, rng)
        nibbles = np.full(levels.size + (levels.size & 1), 8, np.uint8)
        nibbles[: levels.size] = levels.view(np.uint8) + 8  # int8 -7..7 -> 1..15 (mod 256)
        packed = nibbles[0::2] | (nibbles[1::2] << 4)
        return scales.astype("<f4").tobytes() + packed.tobytes()

    def decode(self, data: memoryview, m: int, where: str) -> np.ndarray:
        nb = -(-m // self.block)
        scales = _scales(data, nb, where)
        packed = np.frombuffer(data, dtype=np.uint8, count=(m + 1) // 2, offset=4 * nb)
        nibbles = np.empty(packed.size * 2, np.uint8)
        nibbles[0::2] = packed & 0x0F
        nibbles[1::2] = packed >> 4
        if m and nibbles[:m].min() == 0:
            raise DecodeError(Reason.BAD_TENSOR, f"{where}: q4 nibble 0 (level -8) is outside [-7, 7]")
        if m & 1 and nibbles[m] != 8:
            raise DecodeError(Reason.BAD_TENSOR, f"{where}: q4 padding nibble must be 8 (level 0)")
        levels = nibbles[:m].astype(np.int8) - np.int8(8)
        return _apply_scales(levels, scales, self.block, m)
