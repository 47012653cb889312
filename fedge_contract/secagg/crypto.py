"""Key agreement, key derivation and authenticated encryption, all through ``cryptography``.

- X25519 for both of a device's key pairs (one to encrypt shares, one to derive pairwise masks).
- HKDF-SHA256 turns every raw X25519 output or seed into a key for one purpose only; the
  derivation binds the fleet, round, session and the parties (``Context.info``), so no key is
  ever valid in another round, session, direction or role.
- ChaCha20-Poly1305 encrypts shares, with the sender, recipient, round and phase as associated
  data. ChaCha20 rather than AES: many edge boards (the Raspberry Pi 4's Cortex-A72 among them)
  have no AES instructions, where ChaCha20 is fast and constant-time in software.

Randomness is injected (``Randomness``: n -> n random bytes), so tests are deterministic;
production passes ``os.urandom``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from fedge_contract.errors import Reason
from fedge_contract.secagg.errors import ProtocolError

Randomness = Callable[[int], bytes]

KEY_BYTES = 32
NONCE_BYTES = 12
TAG_BYTES = 16
DOMAIN = b"fedge-secagg-v1"


@dataclass(frozen=True)
class Context:
    """What every derived key and associated data is bound to: one protocol session of one round."""

    fleet: str
    round: int
    session: str

    def info(self, purpose: str, *parties: str) -> bytes:
        """An unambiguous byte string: each part length-prefixed, so no two tuples encode alike."""
        parts = [DOMAIN, purpose.encode(), self.fleet.encode(), str(self.round).encode(), self.session.encode()]
        parts += [p.encode() for p in parties]
        return b"".join(len(p).to_bytes(2, "big") + p for p in parts)


@dataclass(frozen=True)
class KeyPair:
    private: bytes
    public: bytes

    @classmethod
    def generate(cls, random: Randomness) -> KeyPair:
        private = X25519PrivateKey.from_private_bytes(random(KEY_BYTES))
        return cls(private.private_bytes_raw(), private.public_key().public_bytes_raw())


_PROBE = X25519PrivateKey.from_private_bytes(bytes(range(1, 33)))  # any fixed key: low-order points give all zeros with all keys


def check_public_key(public: bytes, *, peer: str) -> None:
    """Refuse a public key no one can agree a secret with (a low-order point)."""
    try:
        _PROBE.exchange(X25519PublicKey.from_public_bytes(public))
    except ValueError as exc:
        raise ProtocolError(Reason.UNAUTHENTIC, f"public key of {peer} is not usable for X25519 ({exc})", sender=peer) from None


def public_key_of(private: bytes) -> bytes:
    return X25519PrivateKey.from_private_bytes(private).public_key().public_bytes_raw()


def agree(private: bytes, peer_public: bytes, *, peer: str) -> bytes:
    """The raw X25519 shared secret; a low-order (all-zero result) public key is refused."""
    try:
        return X25519PrivateKey.from_private_bytes(private).exchange(X25519PublicKey.from_public_bytes(peer_public))
    except ValueError as exc:
        raise ProtocolError(Reason.UNAUTHENTIC, f"public key of {peer} is not usable for X25519 ({exc})", sender=peer) from None


def derive(secret: bytes, info: bytes) -> bytes:
    """A 32-byte key for the purpose ``info`` names (HKDF-SHA256, no salt: the inputs are uniform secrets)."""
    return HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=None, info=info).derive(secret)


def commitment(secret: bytes, info: bytes) -> bytes:
    """A binding commitment to a uniformly random 32-byte secret: SHA-256 over the context and the secret."""
    return hashlib.sha256(info + secret).digest()


def seal(key: bytes, nonce: bytes, plaintext: bytes, associated: bytes) -> bytes:
    """``nonce || ciphertext || tag``."""
    return nonce + ChaCha20Poly1305(key).encrypt(nonce, plaintext, associated)


def open_sealed(key: bytes, box: bytes, associated: bytes, *, sender: str) -> bytes:
    if len(box) < NONCE_BYTES + TAG_BYTES:
        raise ProtocolError(Reason.UNAUTHENTIC, f"box from {sender} is too short", sender=sender)
    try:
        return ChaCha20Poly1305(key).decrypt(box[:NONCE_BYTES], box[NONCE_BYTES:], associated)
    except InvalidTag:
        raise ProtocolError(
            Reason.UNAUTHENTIC, f"box from {sender} does not authenticate (tampered, or not for this recipient, round or phase)",
            sender=sender,
        ) from None
