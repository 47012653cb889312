"""Sealed shares: one device's shares of its mask seed and mask key, encrypted for one neighbour.

The key comes from X25519 of the sender's and recipient's cipher keys, through HKDF bound to the
session, the direction (sender, recipient) and the purpose; the associated data binds the same,
plus the phase. A box moved to another recipient, round, session or phase, or altered by the relay,
fails to open. Each direction of each pair has its own key and carries one box; the random nonce
is there so that even a device that re-ran a phase with the same keys could not reuse a nonce.
"""

from __future__ import annotations

from fedge_contract.secagg import crypto, shamir
from fedge_contract.secagg.crypto import NONCE_BYTES, Context, Randomness

PHASE = "share"


def _key(context: Context, cipher_private: bytes, peer_public: bytes, sender: str, recipient: str, peer: str) -> bytes:
    shared = crypto.agree(cipher_private, peer_public, peer=peer)
    return crypto.derive(shared, context.info("share-key", sender, recipient))


def seal(
    context: Context, cipher_private: bytes, recipient_public: bytes, sender: str, recipient: str,
    seed_share: int, key_share: int, random: Randomness,
) -> bytes:
    key = _key(context, cipher_private, recipient_public, sender, recipient, recipient)
    plaintext = shamir.share_to_bytes(seed_share) + shamir.share_to_bytes(key_share)
    return crypto.seal(key, random(NONCE_BYTES), plaintext, context.info(PHASE, sender, recipient))


def open_box(
    context: Context, cipher_private: bytes, sender_public: bytes, sender: str, recipient: str, box: bytes,
) -> tuple[int, int]:
    """(the share of the sender's mask seed, the share of its mask key); ProtocolError if it does not authenticate."""
    key = _key(context, cipher_private, sender_public, sender, recipient, sender)
    plaintext = crypto.open_sealed(key, box, context.info(PHASE, sender, recipient), sender=sender)
    what = f"box from {sender}"
    half = shamir.SHARE_BYTES
    return shamir.share_from_bytes(plaintext[:half], what=what), shamir.share_from_bytes(plaintext[half:], what=what)
