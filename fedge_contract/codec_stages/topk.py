"""topk:<fraction>: send only the largest-magnitude coordinates of a tensor.

``k = max(1, ceil(fraction * n))`` (0 for an empty tensor), so both sides know ``k`` from the
codec text and the shape: nothing on the wire says how many. Positions travel first, as ``k``
unsigned gaps (the first is the position itself, each next one the distance to the previous),
each as wide as the largest possible position needs: u8 up to 256 elements, u16 up to 65,536,
else u32, stored byte-planar (all low bytes first). Small gaps leave the high bytes zero, one run
the lossless stage then squeezes. The
decoder refuses a zero gap after the first (a duplicate) and a position past the end; unsigned
gaps cannot go backwards, so accepted positions are strictly increasing.

Followed by the ``rice`` stage (``topk:0.01+rice+q4``), the positions travel Rice-coded instead
(codec_stages.rice): near their entropy, and of a length the decoder bounds rather than knows.

What is not sent is the sender's business: the agent keeps it as an error-feedback residual
(edge_agent.residuals) and adds it to its next delta.
"""

from __future__ import annotations

import math

import numpy as np

from fedge_contract.codec_stages.rice import Rice, rice_bounds, rice_decode, rice_encode
from fedge_contract.errors import CodecError, DecodeError, Reason

MAX_FRACTION_TEXT = 16  # characters of a topk fraction (the parser refuses longer ones)


def fraction_text(k: int, n: int) -> str | None:
    """The shortest ``topk:<fraction>`` argument that keeps exactly ``k`` of ``n`` coordinates (None: no decimal
    of at most MAX_FRACTION_TEXT characters does). Integer arithmetic proposes, ``count`` confirms."""
    if not 0 < k <= n:
        raise ValueError(f"cannot keep {k} of {n} coordinates")
    if k == n:
        return "1"
    for decimals in range(1, MAX_FRACTION_TEXT - 1):
        scale = 10**decimals
        below = k * scale // n
        for numerator in (below, below + 1, below - 1):  # the decimals around k / n (float products may land either side)
            if not 0 < numerator < scale:
                continue
            text = f"0.{numerator:0{decimals}d}"
            if TopK(text).count(n) == k:
                return text
    return None


def index_dtype(n: int) -> np.dtype:
    """The narrowest unsigned type holding every position below ``n``."""
    if n <= 1 << 8:
        return np.dtype("u1")
    if n <= 1 << 16:
        return np.dtype("<u2")
    return np.dtype("<u4")


class TopK:
    positions: Rice | None = None  # set by the chain's parser when a ``rice`` stage follows

    def __init__(self, arg: str) -> None:
        try:
            fraction = float(arg)
        except ValueError:
            fraction = math.nan
        if len(arg) > 16 or not 0.0 < fraction <= 1.0:  # NaN fails the comparison too
            raise CodecError(f"topk needs a fraction in (0, 1], e.g. topk:0.01, got {arg!r}")
        self.fraction = fraction
        self.text = f"topk:{arg}"

    def count(self, n: int) -> int:
        return 0 if n == 0 else min(n, max(1, math.ceil(self.fraction * n)))

    def coded_by(self, positions: Rice) -> TopK:
        """This stage with its positions coded by ``positions`` (the parser's, once, on a fresh stage)."""
        self.positions = positions
        return self

    def index_bounds(self, n: int) -> tuple[int, int]:
        """Fewest and most bytes of the position section for ``n`` elements (equal: byte-planar gaps)."""
        if self.positions is not None:
            return rice_bounds(n, self.count(n))
        size = self.count(n) * index_dtype(n).itemsize
        return size, size

    def select(self, values: np.ndarray) -> np.ndarray:
        n, k = values.size, self.count(values.size)
        if k == n:
            return np.arange(n, dtype=np.int64)
        magnitude = np.abs(values)
        # NaN sorts above every number: a non-finite delta is sent (and refused by the
        # receiver) rather than silently dropped into the residual.
        part = np.argpartition(magnitude, n - k)[n - k :]
        return np.sort(part).astype(np.int64)

    def encode_indices(self, indices: np.ndarray, n: int) -> bytes:
        if self.positions is not None:
            return rice_encode(indices)
        gaps = np.diff(indices, prepend=0).astype(index_dtype(n))
        # byte-planar: every gap's low byte, then every second byte, ...: the mostly-zero high
        # bytes become one run the lossless stage squeezes (digits: 199 -> 174 bytes; 1M: -17%)
        return gaps.view(np.uint8).reshape(-1, gaps.itemsize).T.tobytes()

    def decode_indices(self, data: memoryview, n: int, where: str) -> np.ndarray:
        k = self.count(n)
        if self.positions is not None:
            return rice_decode(data, n, k, where)
        dtype = index_dtype(n)
        planes = np.frombuffer(data, dtype=np.uint8, count=k * dtype.itemsize).reshape(dtype.itemsize, k)
        gaps = np.ascontiguousarray(planes.T).view(dtype).reshape(k)
        if k > 1 and not gaps[1:].all():
            raise DecodeError(Reason.BAD_TENSOR, f"{where}: topk positions repeat (a zero gap)")
        indices = np.cumsum(gaps, dtype=np.int64)
        if k and indices[-1] >= n:
            raise DecodeError(Reason.BAD_TENSOR, f"{where}: topk position {int(indices[-1])} is past the end ({n} elements)")
        return indices
