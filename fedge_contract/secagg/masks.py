"""How a device's masks are derived, so that the device adding them and the server removing them agree.

A device u adds to its input x_u:
- its self mask PRG(b_u), b_u a fresh 32-byte seed: it hides y_u even from a server that later
  learns u's mask key (a device that was only slow, wrongly declared dropped);
- for each neighbour v it exchanged shares with, +PRG(s_uv) if u < v, else -PRG(s_uv), where s_uv
  comes from X25519(u's mask key, v's mask key): the same for both, so in the sum of both inputs
  the pair's masks cancel.

The server removes the self masks of the survivors (from their reconstructed seeds) and the pair
masks survivors added towards dropped neighbours (from the dropped devices' reconstructed mask keys).
"""

from __future__ import annotations

import numpy as np

from fedge_contract.secagg import crypto, prg
from fedge_contract.secagg.crypto import Context
from fedge_contract.secagg.ring import Ring


def self_mask(context: Context, seed: bytes, owner: str, ring: Ring, length: int) -> np.ndarray:
    return prg.expand(crypto.derive(seed, context.info("self-mask", owner)), ring, length)


def pair_mask(context: Context, shared: bytes, a: str, b: str, ring: Ring, length: int) -> np.ndarray:
    """The mask of the pair {a, b} from their raw X25519 secret (order of a and b does not matter)."""
    low, high = sorted((a, b))
    return prg.expand(crypto.derive(shared, context.info("pair-mask", low, high)), ring, length)


def adds_pair_mask(owner: str, peer: str) -> bool:
    """Whether ``owner`` adds (rather than subtracts) the mask it shares with ``peer``."""
    return owner < peer


def seed_commitment(context: Context, seed: bytes, owner: str) -> bytes:
    """What a device commits to before masking, so a reconstructed seed can be checked."""
    return crypto.commitment(seed, context.info("seed-commitment", owner))
