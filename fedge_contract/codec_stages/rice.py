"""rice: top-k positions as Rice-coded gaps, within ~3% of their entropy.

``topk`` sends ``k`` sorted positions out of ``n``. Whatever their order, such a set holds at most
``log2(C(n, k))`` bits, ~``k * (log2(n / k) + 1.44)``: 97 bytes for the digits model's 1% (97 of
9,610), 344 for its 5%. Byte-planar gaps under zstd took 140 and 386 (zstd's literal coder works
on whole bytes and pays for its tables on every small frame). Rice codes (Golomb codes with a
power-of-two divisor; Rice 1979) are optimal for geometric gaps, which is what top-k positions of a
delta are close to, and take 100 and 354 bytes here.

Each gap ``g_i = p_i - p_{i-1} - 1`` (``p_{-1} = -1``; strictly increasing positions make every gap
``>= 0``, so a duplicate cannot even be written) is split into a quotient ``g >> b``, sent in unary,
and ``b`` low bits. The two parts travel as two streams rather than interleaved, which is the same
number of bits but lets both sides run vectorised (numpy) instead of bit by bit in Python:

    byte 0      b, the Rice parameter, chosen by the encoder for the fewest bits (at most the bit
                length of n - k: no gap is longer)
    remainders  k values of b bits each, MSB first, packed: exactly ceil(k * b / 8) bytes
    unary       for each gap, its quotient as that many 0 bits then a 1; zero-padded to a byte

Nothing in the section says how long it is: the chain's value section after it has an exact size,
so the position section is what remains, and the decoder bounds it from ``n`` and ``k`` before
reading it. Every valid gap sequence sums to at most ``n - k``, so its quotients sum to at most
``(n - k) >> b``: the unary stream holds at most ``k + ((n - k) >> b)`` bits, padded to the next
byte. A section longer than that, a unary stream without exactly ``k`` terminating 1s, a whole
byte of padding, or gaps that run past position ``n - 1`` is a DecodeError, before any array of
the payload's choosing is built.
"""

from __future__ import annotations

import numpy as np

from fedge_contract.errors import CodecError, DecodeError, Reason

__all__ = ["MAX_PARAMETER", "Rice", "max_parameter", "rice_bounds", "rice_decode", "rice_encode"]

MAX_PARAMETER = 31  # gaps below 2**31 * (quotient + 1): positions of any tensor a shape can describe


def _bits_for(gaps: np.ndarray, b: int) -> int:
    """Length in bits of the gaps' Rice code with parameter ``b`` (without the parameter byte and padding)."""
    return gaps.size * (b + 1) + int(np.sum(gaps >> b))


def _parameter(gaps: np.ndarray) -> int:
    """The ``b`` that codes ``gaps`` in the fewest bits (the cost is convex in b: search near the mean's log)."""
    if gaps.size == 0:
        return 0
    mean = float(gaps.mean())
    guess = max(0, int(np.log2(mean)) if mean >= 1 else 0)
    candidates = range(max(0, guess - 2), min(MAX_PARAMETER, guess + 3) + 1)
    return min(candidates, key=lambda b: _bits_for(gaps, b))


def rice_encode(indices: np.ndarray) -> bytes:
    """Strictly increasing int64 positions as the section described in the module docstring."""
    gaps: np.ndarray = np.diff(indices.astype(np.int64, copy=False), prepend=-1) - 1
    b = _parameter(gaps)
    quotients = gaps >> b
    remainders = gaps & ((1 << b) - 1)
    if b:
        shifts = np.arange(b - 1, -1, -1, dtype=np.int64)
        bits = ((remainders[:, None] >> shifts) & 1).astype(np.uint8)
        packed_remainders = np.packbits(bits.reshape(-1)).tobytes()
    else:
        packed_remainders = b""
    unary = np.zeros(int(quotients.sum()) + gaps.size, np.uint8)
    unary[np.cumsum(quotients + 1) - 1] = 1  # each quotient's terminating 1
    return bytes([b]) + packed_remainders + np.packbits(unary).tobytes()


def max_parameter(n: int, k: int) -> int:
    """The largest useful ``b``: every gap is at most ``n - k``, and a ``b`` past its bit length only adds
    bits (the encoder never picks one). Bounding it bounds what the decoder unpacks: ``k * b`` bits."""
    return min(MAX_PARAMETER, (n - k).bit_length())


def rice_bounds(n: int, k: int) -> tuple[int, int]:
    """Fewest and most bytes a valid section of ``k`` positions out of ``n`` can take, over every ``b``."""
    if k == 0:
        return 1, 1
    smallest = 1 + -(-k // 8)  # b = 0, every gap 0
    largest = 1 + max(-(-k * b // 8) + -(-(k + ((n - k) >> b)) // 8) for b in range(max_parameter(n, k) + 1))
    return smallest, largest


def rice_decode(data: memoryview, n: int, k: int, where: str) -> np.ndarray:
    """The positions of a section (sorted int64, all below ``n``), or DecodeError naming what is wrong."""
    if len(data) < 1:
        raise DecodeError(Reason.BAD_TENSOR, f"{where}: rice positions are missing their parameter byte")
    b = data[0]
    if b > max_parameter(n, k):
        raise DecodeError(Reason.BAD_TENSOR, f"{where}: rice parameter {b} is above {max_parameter(n, k)}, the most {k} of {n} positions use")
    remainder_bytes = -(-k * b // 8)
    unary_bytes = len(data) - 1 - remainder_bytes
    most_unary_bits = k + ((n - k) >> b)
    if unary_bytes < -(-k // 8) or unary_bytes > -(-most_unary_bits // 8):
        raise DecodeError(Reason.BAD_TENSOR,
                          f"{where}: {len(data)} bytes of rice positions cannot hold {k} of {n} positions with b = {b}")
    if k == 0:
        return np.zeros(0, np.int64)
    unary = np.unpackbits(np.frombuffer(data, np.uint8, count=unary_bytes, offset=1 + remainder_bytes))
    ends = np.flatnonzero(unary)
    if ends.size != k:
        raise DecodeError(Reason.BAD_TENSOR, f"{where}: rice positions hold {ends.size} gaps, expected {k}")
    if int(ends[-1]) // 8 != unary_bytes - 1:
        raise DecodeError(Reason.BAD_TENSOR, f"{where}: rice positions end with a whole byte of padding")
    quotients = np.diff(ends, prepend=-1) - 1
    if int(quotients.sum()) > (n - k) >> b:
        raise DecodeError(Reason.BAD_TENSOR, f"{where}: rice positions run past the end ({n} elements)")
    gaps = quotients << b
    if b:
        bits = np.unpackbits(np.frombuffer(data, np.uint8, count=remainder_bytes, offset=1))
        if bits[k * b :].any():
            raise DecodeError(Reason.BAD_TENSOR, f"{where}: rice remainders are padded with 1 bits")
        columns = bits[: k * b].reshape(k, b)
        for j in range(b):  # MSB first: column j weighs 2**(b - 1 - j)
            gaps |= columns[:, j].astype(np.int64) << (b - 1 - j)
    if int(gaps.sum()) > n - k:
        raise DecodeError(Reason.BAD_TENSOR, f"{where}: rice positions run past the end ({n} elements)")
    return np.cumsum(gaps + 1) - 1


class Rice:
    """The ``rice`` stage: codes the positions of the chain's ``topk`` stage (it takes no argument)."""

    text = "rice"

    def __init__(self, arg: str = "") -> None:
        if arg:
            raise CodecError("stage 'rice' takes no argument")
