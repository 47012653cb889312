"""The protocol's eight messages: dataclasses with one encoder and one strict decoder each.

Every message carries ``schema``, ``type``, ``fleet``, ``round``, ``session`` (one run of the
protocol for that round: a retried round gets a new one) and ``sender``. The two broadcasts,
``Setup`` and ``UnmaskRequest``, are JSON (readable with mosquitto_sub, like RoundStatus); the
others carry keys, ciphertexts or vectors and are msgpack. Lists of ids are sorted without
repeats, so equal messages are equal bytes and a resend can be told from a change.

    phase        device -> server                 server -> device(s)
    advertise    KeyAdvert (two X25519 keys)      Setup (broadcast, opens the session)
    share        Shares (sealed, per neighbour)   KeyList (to each member: graph seed, neighbours' keys)
    mask         MaskedInput (the ring vector)    ShareBundle (to each: the sealed shares addressed to it)
    unmask       Reveal (shares of seeds, keys)   UnmaskRequest (broadcast: survivors, dropped)
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, ClassVar, Self

from fedge_contract.errors import DecodeError, Reason
from fedge_contract.messages import SCHEMA_VERSION
from fedge_contract.secagg import wire
from fedge_contract.secagg.crypto import KEY_BYTES, NONCE_BYTES, TAG_BYTES, Context
from fedge_contract.secagg.errors import ParameterError
from fedge_contract.secagg.fixedpoint import FixedPoint
from fedge_contract.secagg.graph import SEED_BYTES
from fedge_contract.secagg.ring import MAX_BITS, MIN_BITS, Ring
from fedge_contract.secagg.shamir import SHARE_BYTES
from fedge_contract.topics import check_name

MAX_COHORT = 10_000
MAX_LENGTH = 1 << 27  # 134M coordinates: 512 MiB of 32-bit ring elements, beyond any fedge model
MAX_CLIP = 1e6
DEFAULT_MAX_BYTES = 2 * 1024 * 1024  # every message but MaskedInput: 10,000 ids fit with room
PLAINTEXT_BYTES = 2 * SHARE_BYTES  # a sealed share holds the share of the mask seed, then of the mask key
BOX_BYTES = NONCE_BYTES + PLAINTEXT_BYTES + TAG_BYTES


def _check_name(kind: str, value: str) -> None:
    try:
        check_name(kind, value)
    except ValueError as exc:
        raise ParameterError(str(exc)) from None


@dataclass(frozen=True)
class Message:
    """Fields and framing common to every protocol message."""

    TYPE: ClassVar[str]
    JSON: ClassVar[bool] = False
    fleet: str
    round: int
    session: str
    sender: str

    @property
    def context(self) -> Context:
        return Context(self.fleet, self.round, self.session)

    def _body(self) -> dict[str, Any]:
        raise NotImplementedError

    def to_bytes(self) -> bytes:
        body = {
            "schema": SCHEMA_VERSION, "type": self.TYPE, "fleet": self.fleet, "round": self.round,
            "session": self.session, "sender": self.sender, **self._body(),
        }
        return wire.pack_json(body) if self.JSON else wire.pack(body)

    @classmethod
    def _read(cls, fields: wire.Fields) -> dict[str, Any]:
        raise NotImplementedError

    @classmethod
    def from_bytes(cls, payload: bytes, *, fleet: str | None = None, max_bytes: int = DEFAULT_MAX_BYTES) -> Self:
        obj = wire.unpack_json(payload, max_bytes, cls.TYPE) if cls.JSON else wire.unpack(payload, max_bytes, cls.TYPE)
        fields = wire.Fields(obj, cls.TYPE)
        wire.check_header(fields, cls.TYPE, fleet)
        head: dict[str, Any] = {
            "fleet": fields.name("fleet"), "round": fields.integer("round", 0, wire.MAX_ROUND),
            "session": fields.name("session"), "sender": fields.name("sender"),
        }
        try:
            return cls(**head, **cls._read(fields))
        except ParameterError as exc:
            raise DecodeError(Reason.BAD_VALUE, f"{cls.TYPE}: {exc}") from None


@dataclass(frozen=True)
class Setup(Message):
    """Opens a session: who is invited and the protocol's parameters (retained broadcast)."""

    TYPE: ClassVar[str] = "secagg_setup"
    JSON: ClassVar[bool] = True
    cohort: tuple[str, ...]  # the devices invited, sorted
    degree: int  # k: neighbours per device (even); the graph is complete when the members are k + 1 or fewer
    threshold: int  # t: shares that rebuild a device's secret, out of its k neighbours'
    min_survivors: int  # the fewest inputs a revealed sum may hold
    ring_bits: int
    length: int  # coordinates of every input vector
    clip: float  # fixed-point clipping range: each coordinate in [-clip, clip]

    def __post_init__(self) -> None:
        _check_name("session", self.session)
        if not 2 <= len(self.cohort) <= MAX_COHORT or list(self.cohort) != sorted(set(self.cohort)):
            raise ParameterError(f"the cohort must be 2-{MAX_COHORT} sorted, distinct ids")
        for member in self.cohort:
            _check_name("client id", member)
        if self.degree < 2 or self.degree % 2 or self.degree > MAX_COHORT:
            raise ParameterError(f"degree must be even and in 2..{MAX_COHORT}, got {self.degree}")
        if not 2 <= self.threshold <= min(self.degree, len(self.cohort) - 1):
            raise ParameterError(
                f"threshold must be in 2..{min(self.degree, len(self.cohort) - 1)} (degree {self.degree}, "
                f"cohort of {len(self.cohort)}), got {self.threshold}"
            )
        if not 2 <= self.min_survivors <= len(self.cohort):
            raise ParameterError(f"min_survivors must be in 2..{len(self.cohort)}, got {self.min_survivors}")
        if not 1 <= self.length <= MAX_LENGTH:
            raise ParameterError(f"length must be in 1..{MAX_LENGTH}, got {self.length}")
        FixedPoint(Ring(self.ring_bits), self.clip, len(self.cohort))  # the ring bits leave room for the cohort's sum

    @property
    def ring(self) -> Ring:
        return Ring(self.ring_bits)

    @property
    def fixed_point(self) -> FixedPoint:
        return FixedPoint(self.ring, self.clip, len(self.cohort))

    def _body(self) -> dict[str, Any]:
        return {
            "cohort": list(self.cohort), "degree": self.degree, "threshold": self.threshold,
            "min_survivors": self.min_survivors, "ring_bits": self.ring_bits, "length": self.length, "clip": self.clip,
        }

    @classmethod
    def _read(cls, fields: wire.Fields) -> dict[str, Any]:
        return {
            "cohort": fields.names("cohort", MAX_COHORT),
            "degree": fields.integer("degree", 2, MAX_COHORT),
            "threshold": fields.integer("threshold", 2, MAX_COHORT),
            "min_survivors": fields.integer("min_survivors", 2, MAX_COHORT),
            "ring_bits": fields.integer("ring_bits", MIN_BITS, MAX_BITS),
            "length": fields.integer("length", 1, MAX_LENGTH),
            "clip": fields.number("clip", 0.0, MAX_CLIP),
        }


@dataclass(frozen=True)
class KeyAdvert(Message):
    """A device's two fresh public keys: one to receive sealed shares, one to derive pairwise masks."""

    TYPE: ClassVar[str] = "secagg_advert"
    cipher_key: bytes
    mask_key: bytes

    def _body(self) -> dict[str, Any]:
        return {"cipher_key": self.cipher_key, "mask_key": self.mask_key}

    @classmethod
    def _read(cls, fields: wire.Fields) -> dict[str, Any]:
        return {"cipher_key": fields.blob("cipher_key", KEY_BYTES), "mask_key": fields.blob("mask_key", KEY_BYTES)}


@dataclass(frozen=True)
class PeerKeys:
    client_id: str
    cipher_key: bytes
    mask_key: bytes


@dataclass(frozen=True)
class KeyList(Message):
    """To one member: who advertised keys (the graph's members), the graph seed, its neighbours' keys."""

    TYPE: ClassVar[str] = "secagg_keys"
    recipient: str
    members: tuple[str, ...]
    graph_seed: bytes
    peers: tuple[PeerKeys, ...]  # sorted by client id

    def _body(self) -> dict[str, Any]:
        return {
            "recipient": self.recipient, "members": list(self.members), "graph_seed": self.graph_seed,
            "peers": [{"client_id": p.client_id, "cipher_key": p.cipher_key, "mask_key": p.mask_key} for p in self.peers],
        }

    @classmethod
    def _read(cls, fields: wire.Fields) -> dict[str, Any]:
        peers = tuple(
            PeerKeys(item.name("client_id"), item.blob("cipher_key", KEY_BYTES), item.blob("mask_key", KEY_BYTES))
            for item in fields.items("peers", MAX_COHORT)
        )
        wire.strictly_increasing(tuple(p.client_id for p in peers), f"{cls.TYPE}.peers")
        return {
            "recipient": fields.name("recipient"), "members": fields.names("members", MAX_COHORT),
            "graph_seed": fields.blob("graph_seed", SEED_BYTES), "peers": peers,
        }


@dataclass(frozen=True)
class SealedShare:
    """One ciphertext between two devices: ``peer`` is its recipient in Shares, its sender in a ShareBundle."""

    peer: str
    box: bytes  # nonce || ChaCha20-Poly1305(share of the mask seed || share of the mask key)


def _boxes(fields: wire.Fields, kind: str) -> tuple[SealedShare, ...]:
    boxes = tuple(SealedShare(item.name("peer"), item.blob("box", BOX_BYTES)) for item in fields.items("boxes", MAX_COHORT))
    wire.strictly_increasing(tuple(b.peer for b in boxes), f"{kind}.boxes")
    return boxes


@dataclass(frozen=True)
class Shares(Message):
    """A device's sealed shares, one per neighbour, and a commitment to its mask seed."""

    TYPE: ClassVar[str] = "secagg_shares"
    seed_commitment: bytes
    boxes: tuple[SealedShare, ...]

    def _body(self) -> dict[str, Any]:
        return {"seed_commitment": self.seed_commitment, "boxes": [{"peer": b.peer, "box": b.box} for b in self.boxes]}

    @classmethod
    def _read(cls, fields: wire.Fields) -> dict[str, Any]:
        return {"seed_commitment": fields.blob("seed_commitment", KEY_BYTES), "boxes": _boxes(fields, cls.TYPE)}


@dataclass(frozen=True)
class ShareBundle(Message):
    """To one device: the sealed shares its neighbours addressed to it (relayed unopened)."""

    TYPE: ClassVar[str] = "secagg_bundle"
    recipient: str
    boxes: tuple[SealedShare, ...]

    def _body(self) -> dict[str, Any]:
        return {"recipient": self.recipient, "boxes": [{"peer": b.peer, "box": b.box} for b in self.boxes]}

    @classmethod
    def _read(cls, fields: wire.Fields) -> dict[str, Any]:
        return {"recipient": fields.name("recipient"), "boxes": _boxes(fields, cls.TYPE)}


@dataclass(frozen=True)
class MaskedInput(Message):
    """A device's input plus its masks, as little-endian ring elements."""

    TYPE: ClassVar[str] = "secagg_masked"
    bits: int
    length: int
    data: bytes

    def __post_init__(self) -> None:
        if len(self.data) != self.length * Ring(self.bits).width:
            raise ParameterError(f"{len(self.data)} bytes do not hold {self.length} elements of {self.bits} bits")

    def _body(self) -> dict[str, Any]:
        return {"bits": self.bits, "length": self.length, "data": self.data}

    @classmethod
    def _read(cls, fields: wire.Fields) -> dict[str, Any]:
        bits = fields.integer("bits", MIN_BITS, MAX_BITS)
        length = fields.integer("length", 1, MAX_LENGTH)
        return {"bits": bits, "length": length, "data": fields.blob("data", length * Ring(bits).width)}


@dataclass(frozen=True)
class UnmaskRequest(Message):
    """Who survived (reveal shares of their mask seeds) and who dropped (of their mask keys): one broadcast."""

    TYPE: ClassVar[str] = "secagg_unmask"
    JSON: ClassVar[bool] = True
    survivors: tuple[str, ...]
    dropped: tuple[str, ...]

    def _body(self) -> dict[str, Any]:
        return {"survivors": list(self.survivors), "dropped": list(self.dropped)}

    @classmethod
    def _read(cls, fields: wire.Fields) -> dict[str, Any]:
        return {"survivors": fields.names("survivors", MAX_COHORT), "dropped": fields.names("dropped", MAX_COHORT)}


@dataclass(frozen=True)
class RevealedShare:
    peer: str  # whose secret this is a share of
    share: bytes


def _revealed(fields: wire.Fields, key: str, kind: str) -> tuple[RevealedShare, ...]:
    out = tuple(RevealedShare(item.name("peer"), item.blob("share", SHARE_BYTES)) for item in fields.items(key, MAX_COHORT))
    wire.strictly_increasing(tuple(r.peer for r in out), f"{kind}.{key}")
    return out


@dataclass(frozen=True)
class Reveal(Message):
    """A survivor's answer: shares of its surviving neighbours' mask seeds, of its dropped neighbours' mask keys."""

    TYPE: ClassVar[str] = "secagg_reveal"
    seeds: tuple[RevealedShare, ...]
    keys: tuple[RevealedShare, ...]

    def _body(self) -> dict[str, Any]:
        return {
            "seeds": [{"peer": r.peer, "share": r.share} for r in self.seeds],
            "keys": [{"peer": r.peer, "share": r.share} for r in self.keys],
        }

    @classmethod
    def _read(cls, fields: wire.Fields) -> dict[str, Any]:
        return {"seeds": _revealed(fields, "seeds", cls.TYPE), "keys": _revealed(fields, "keys", cls.TYPE)}


ServerMessage = Setup | KeyList | ShareBundle | UnmaskRequest
DeviceMessage = KeyAdvert | Shares | MaskedInput | Reveal
MESSAGE_TYPES: tuple[type[Message], ...] = (Setup, KeyAdvert, KeyList, Shares, ShareBundle, MaskedInput, UnmaskRequest, Reveal)


def field_names(kind: type[Message]) -> tuple[str, ...]:
    """The wire fields of ``kind`` beyond the common header (tests use it to drop each in turn)."""
    return tuple(f.name for f in fields(kind) if f.name not in {"fleet", "round", "session", "sender"})
