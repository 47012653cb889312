"""sign[:block]: one bit per value, each block of values rebuilt as its sign times the block's mean magnitude.

After ``topk`` the kept values are the largest of the delta, all of a similar size within a block
of neighbours, and the quantisation error does not vanish but goes to the sender's error-feedback
residual (the agent's, or the aggregator's for a broadcast) and rides the next message: that is
what makes a 1-bit value workable (signSGD with error feedback, Karimireddy et al. 2019; top-k with
memory, Stich et al. 2018). The block's scale is the mean of ``|x|``, the one that minimises the
squared error of ``scale * sign(x)``. Deterministic: no rounding stream.

Stored layout (before the lossless stage): ``ceil(m / block)`` little-endian float32 scales, then
``ceil(m / 8)`` bytes of sign bits, value ``i`` in bit ``7 - i % 8`` of byte ``i // 8`` (1: negative),
the pad bits after the last value 0. A negative scale or a 1 pad bit is malformed, a non-finite
scale NON_FINITE.
"""

from __future__ import annotations

import numpy as np

from fedge_contract.codec_stages.quant import _block_arg, _scales
from fedge_contract.errors import DecodeError, Reason


class Sign:
    wire_dtype = "u8"  # packed sign bits
    stochastic = False

    def __init__(self, arg: str = "") -> None:
        self.block = _block_arg("sign", arg)
        self.text = "sign" if not arg else f"sign:{self.block}"

    def nbytes(self, m: int) -> int:
        return 4 * -(-m // self.block) + -(-m // 8)

    def encode(self, values: np.ndarray, rng: np.random.Generator | None) -> bytes:
        m = values.size
        nb = -(-m // self.block)
        padded = np.zeros(nb * self.block, np.float32)
        padded[:m] = np.abs(values)
        counts = np.full(nb, self.block, np.float32)
        if nb:
            counts[-1] = m - (nb - 1) * self.block
        with np.errstate(invalid="ignore", over="ignore"):
            # float64 sums: a float32 sum of large values could overflow where the mean does not; a NaN or
            # Inf value makes its scale non-finite, which the receiver refuses (as q8/q4 do)
            scales = (padded.reshape(nb, self.block).sum(axis=1, dtype=np.float64) / counts).astype(np.float32)
        signs = np.packbits(np.signbit(values))
        return bytes(scales.astype("<f4").tobytes() + signs.tobytes())

    def decode(self, data: memoryview, m: int, where: str) -> np.ndarray:
        nb = -(-m // self.block)
        scales = _scales(data, nb, where)
        packed = np.frombuffer(data, dtype=np.uint8, count=-(-m // 8), offset=4 * nb)
        bits = np.unpackbits(packed)
        if bits[m:].any():
            raise DecodeError(Reason.BAD_TENSOR, f"{where}: sign padding bits must be 0")
        out = np.repeat(scales, self.block)[:m]
        out[bits[:m].astype(bool)] *= np.float32(-1)
        return out
