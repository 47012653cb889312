"""Masks: a 32-byte key expanded into a uniform vector of the ring by the ChaCha20 keystream.

Every key given here is single-use (derived by HKDF for one pair or one device in one session),
so the all-zero nonce is safe. numpy's generators are not cryptographic and are never used for masks.
"""

from __future__ import annotations

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

from fedge_contract.secagg.crypto import KEY_BYTES
from fedge_contract.secagg.errors import ParameterError
from fedge_contract.secagg.ring import Ring

_NONCE = bytes(16)  # ChaCha20 in cryptography: 4-byte block counter + 12-byte nonce, both zero


def expand(key: bytes, ring: Ring, length: int) -> np.ndarray:
    """``length`` uniform elements of ``ring`` from ``key`` (writable; the same key always gives the same mask)."""
    if len(key) != KEY_BYTES:
        raise ParameterError(f"mask keys are {KEY_BYTES} bytes, got {len(key)}")
    stream = Cipher(algorithms.ChaCha20(key, _NONCE), mode=None).encryptor().update(bytes(length * ring.width))
    return ring.reduce(np.frombuffer(stream, dtype=ring.dtype).copy())
