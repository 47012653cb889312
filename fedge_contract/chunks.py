"""Large messages in chunks: the manifest, splitting, verification and bounded reassembly.

A GlobalModel or an Update larger than the sender's ``max_message_bytes`` does not travel as one
MQTT message: MQTT caps a packet at 256 MiB, and Mosquitto's throughput falls from ~400-900 MB/s
with 1-4 MiB messages to ~100-190 MB/s with 64 MiB ones (DESIGN.md, broker facts). The sender
splits the payload into chunks of at most ``max_message_bytes``, publishes each one *retained* on a
sub-topic of the message's topic, then publishes a Manifest on the message's own topic::

    fl/<fleet>/global/<version>/<i>               chunks of a global model   (manifest retained on .../global)
    fl/<fleet>/global/key/<version>/<i>           chunks of a keyframe       (manifest retained on .../global/key)
    fl/<fleet>/global/delta/<version>/<i>         chunks of a retained delta (manifest retained on .../global/delta/<version>)
    fl/<fleet>/updates/<client>/<update_id>/<i>   chunks of an update        (manifest on .../updates/<client>)

The manifest lists each chunk's hash and the whole payload's hash. A receiver keeps a chunk only if
its size and hash are the listed ones, and hands the payload on only when every chunk is present
and the whole hash matches: a partial or mixed set is never used. The payload then goes through the
message's ordinary strict decoder, so every other rule still applies. Chunks are retained so that
whoever receives the manifest (one of several aggregator workers behind a shared subscription, an
agent that connects late) can fetch them by subscribing, with no state shared between receivers.

The manifest is the contract's sixth message; it lives here, beside the rules it describes, and is
decoded with messages.py's strict readers. This module does not touch MQTT (see transfer.py).
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import msgpack

from fedge_contract.errors import ContractError, DecodeError, Reason
from fedge_contract.messages import SCHEMA_VERSION, _header, _Reader, _unpack
from fedge_contract.topics import check_name

# 8 MiB: inside the range where Mosquitto moves messages fastest here (throughput falls beyond a few
# MiB, bench/chunks.py), 8x below the production broker's max_packet_size (64 MiB), and large enough
# that a 256 MiB model is 32 chunks and a manifest of ~1.2 KiB.
DEFAULT_MAX_MESSAGE_BYTES = 8 * 1024 * 1024
MIN_MESSAGE_BYTES = 1024  # smaller chunks only multiply per-message overhead
MAX_CHUNKS = 4096  # 32 GiB in 8 MiB chunks; bounds the manifest to ~140 KiB
MAX_MANIFEST_BYTES = 256 * 1024
DIGEST_BYTES = 32
KINDS = ("global", "update", "keyframe", "delta")
# kinds named by a model version: the announcement, and the retained keyframe and deltas that a
# device catches up from (fedge_contract.broadcast), each with chunk topics of its own
VERSIONED_KINDS = ("global", "keyframe", "delta")
_WHAT = {"global": "global model", "keyframe": "keyframe", "delta": "delta broadcast"}
_MANIFEST_TAG = b"\xa8manifest"  # the msgpack fixstr "manifest"


def _blake2b() -> Any:
    return hashlib.blake2b(digest_size=DIGEST_BYTES)


# sha256 runs at ~1.7 GB/s on CPUs with SHA extensions (x86 SHA-NI, ARMv8 crypto); blake2b is the
# faster choice on CPUs without them. Both give 32-byte digests.
HASHES: dict[str, Callable[[], Any]] = {"sha256": hashlib.sha256, "blake2b": _blake2b}


class Busy(ContractError):
    """The reassembler holds as many messages (or bytes) as its limits allow: try again later."""


def digest_of(algorithm: str, *parts: bytes | bytearray | memoryview) -> bytes:
    hasher = HASHES[algorithm]()
    for part in parts:
        hasher.update(part)
    return hasher.digest()  # type: ignore[no-any-return]


def split(payload: bytes, chunk_size: int) -> list[bytes]:
    """``payload`` in consecutive pieces of ``chunk_size`` bytes (the last one shorter)."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    return [payload[i : i + chunk_size] for i in range(0, len(payload), chunk_size)]


def _views(payload: bytes | bytearray, chunk_size: int) -> list[memoryview]:
    """``split``'s pieces as views (hashing them copies nothing)."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    view = memoryview(payload)
    return [view[i : i + chunk_size] for i in range(0, len(view), chunk_size)]


def _topic_level(reader: _Reader, key: str) -> str:
    value = reader.take(key, str)
    try:
        return check_name(key.replace("_", " "), value)  # it names chunk topics: one topic level, no wildcards
    except ValueError as exc:
        raise DecodeError(Reason.BAD_VALUE, f"{reader.where}: {exc}") from None


def _digest(reader: _Reader, value: object, where: str) -> bytes:
    if not isinstance(value, bytes):
        raise DecodeError(Reason.WRONG_TYPE, f"{reader.where}.{where} must be bin, got {type(value).__name__}")
    if len(value) != DIGEST_BYTES:
        raise DecodeError(Reason.BAD_VALUE, f"{reader.where}.{where} must be {DIGEST_BYTES} bytes, got {len(value)}")
    return value


@dataclass(frozen=True)
class Manifest:
    """What a chunked message stands for: whose it is, its size, and the hash of every chunk."""

    TYPE: ClassVar[str] = "manifest"
    fleet: str
    kind: str  # global | update
    size: int  # bytes of the whole payload
    chunk_size: int  # bytes of every chunk but the last
    hash: str  # a key of HASHES
    chunks: tuple[bytes, ...]  # digest of each chunk, in order
    digest: bytes  # digest of the whole payload
    model_version: int | None = None  # kind global
    client_id: str | None = None  # kind update
    update_id: str | None = None  # kind update

    @classmethod
    def of(cls, payload: bytes | bytearray, *, fleet: str, kind: str, chunk_size: int, hash: str = "sha256", model_version: int | None = None,
           client_id: str | None = None, update_id: str | None = None) -> Manifest:
        """The manifest of ``payload`` cut into ``chunk_size`` pieces (see ``split``)."""
        if kind not in KINDS or not payload:
            raise ValueError(f"a manifest needs a kind in {KINDS} and a non-empty payload")
        if (kind in VERSIONED_KINDS) != (model_version is not None) or (kind == "update") != (client_id is not None and update_id is not None):
            raise ValueError("a global, keyframe or delta manifest names its model_version, an update manifest its client_id and update_id")
        return cls(
            fleet=fleet, kind=kind, size=len(payload), chunk_size=chunk_size, hash=hash,
            chunks=tuple(digest_of(hash, piece) for piece in _views(payload, chunk_size)), digest=digest_of(hash, payload),
            model_version=model_version, client_id=client_id, update_id=update_id,
        )

    @property
    def count(self) -> int:
        return len(self.chunks)

    def chunk_length(self, index: int) -> int:
        return self.chunk_size if index < self.count - 1 else self.size - self.chunk_size * (self.count - 1)

    def describe(self) -> str:
        what = f"{_WHAT[self.kind]} v{self.model_version}" if self.kind in VERSIONED_KINDS else f"update {self.update_id} of {self.client_id}"
        return f"{what} ({self.size} bytes in {self.count} chunks)"

    def check_chunk(self, index: int, data: bytes) -> None:
        """Raise DecodeError(BAD_CHUNK) unless ``data`` is chunk ``index`` of this manifest."""
        if not 0 <= index < self.count:
            raise DecodeError(Reason.BAD_CHUNK, f"chunk {index} of {self.describe()}, which has chunks 0-{self.count - 1}")
        if len(data) != self.chunk_length(index):
            raise DecodeError(Reason.BAD_CHUNK, f"chunk {index} of {self.describe()} is {len(data)} bytes, not {self.chunk_length(index)}")
        if digest_of(self.hash, data) != self.chunks[index]:
            raise DecodeError(Reason.BAD_CHUNK, f"chunk {index} of {self.describe()} does not match its {self.hash} hash")

    def to_bytes(self) -> bytes:
        packed: bytes = msgpack.packb(
            {
                "schema": SCHEMA_VERSION, "type": self.TYPE, "fleet": self.fleet, "kind": self.kind,
                "model_version": self.model_version, "client_id": self.client_id, "update_id": self.update_id,
                "size": self.size, "chunk_size": self.chunk_size, "hash": self.hash, "chunks": list(self.chunks), "digest": self.digest,
            },
            use_bin_type=True,
        )
        return packed

    @classmethod
    def from_bytes(cls, payload: bytes, *, max_size: int, fleet: str | None = None, max_chunks: int = MAX_CHUNKS) -> Manifest:
        """Strict decode; ``max_size`` is the largest whole payload the receiver accepts."""
        reader = _header(_unpack(payload, MAX_MANIFEST_BYTES, cls.TYPE), cls.TYPE, fleet)
        kind = reader.take("kind", str)
        if kind not in KINDS:
            raise DecodeError(Reason.BAD_VALUE, f"manifest.kind {kind!r} is not one of {', '.join(KINDS)}")
        version = reader.nonneg_int("model_version") if kind in VERSIONED_KINDS else None
        if kind == "delta" and version == 0:
            raise DecodeError(Reason.BAD_VALUE, "manifest of a delta broadcast for version 0: a delta makes a version >= 1")
        client_id = _topic_level(reader, "client_id") if kind == "update" else None
        update_id = _topic_level(reader, "update_id") if kind == "update" else None
        size, chunk_size = reader.take("size", int), reader.take("chunk_size", int)
        if size < 1 or chunk_size < 1:
            raise DecodeError(Reason.BAD_VALUE, f"manifest.size and chunk_size must be >= 1, got {size} and {chunk_size}")
        if size > max_size:
            raise DecodeError(Reason.TOO_LARGE, f"chunked {kind} of {size} bytes exceeds the limit of {max_size}")
        needed = -(-size // chunk_size)
        if needed > max_chunks:
            raise DecodeError(Reason.TOO_LARGE, f"{size} bytes in chunks of {chunk_size} make {needed} chunks (limit {max_chunks})")
        algorithm = reader.take("hash", str)
        if algorithm not in HASHES:
            raise DecodeError(Reason.BAD_VALUE, f"manifest.hash {algorithm!r} is not one of {', '.join(HASHES)}")
        listed = reader.take("chunks", list)
        if len(listed) != needed:
            raise DecodeError(Reason.BAD_VALUE, f"manifest lists {len(listed)} chunks, but {size} bytes in chunks of {chunk_size} make {needed}")
        return cls(
            fleet=reader.take("fleet", str), kind=kind, size=size, chunk_size=chunk_size, hash=algorithm,
            chunks=tuple(_digest(reader, value, f"chunks[{i}]") for i, value in enumerate(listed)),
            digest=_digest(reader, reader.take("digest", bytes), "digest"),
            model_version=version, client_id=client_id, update_id=update_id,
        )

    @staticmethod
    def peek_update_id(payload: bytes) -> str | None:
        """Best-effort update id of a manifest that failed to decode, so its receipt can name it."""
        if len(payload) > MAX_MANIFEST_BYTES:
            return None
        try:
            obj = msgpack.unpackb(payload, raw=False, strict_map_key=True)
        except Exception:  # msgpack raises several unrelated types for broken input
            return None
        value = obj.get("update_id") if isinstance(obj, dict) else None
        return value if isinstance(value, str) and len(value) <= 64 else None


def is_manifest(payload: bytes) -> bool:
    """Whether ``payload`` (found on a message's own topic) is a manifest rather than the message.

    Every update passes through here, so the common case is cheap: a payload over
    MAX_MANIFEST_BYTES, not a msgpack map, or without the msgpack string "manifest" (a short
    string, which encoders write as a fixstr) is not looked into further. Only the rest is unpacked.
    """
    if not payload or len(payload) > MAX_MANIFEST_BYTES:
        return False
    if (payload[0] & 0xF0) != 0x80 and payload[0] not in (0xDE, 0xDF):
        return False  # not a msgpack map (fixmap, map16, map32): JSON, a raw blob, ...
    if _MANIFEST_TAG not in payload:
        return False
    try:
        obj = msgpack.unpackb(payload, raw=False, strict_map_key=True)
    except Exception:  # msgpack raises several unrelated types for broken input
        return False
    return isinstance(obj, dict) and obj.get("type") == Manifest.TYPE


def assemble(manifest: Manifest, chunks: Mapping[int, bytes]) -> bytes:
    """The whole payload from a complete, verified set of chunks.

    Raises DecodeError: INCOMPLETE if a chunk is missing, BAD_CHUNK if one (or the whole) does not
    match the manifest. Extra keys in ``chunks`` are refused too: a set is exactly the manifest's.
    """
    missing = [i for i in range(manifest.count) if i not in chunks]
    if missing:
        raise DecodeError(Reason.INCOMPLETE, f"{manifest.describe()}: chunks {_ranges(missing)} are missing")
    extra = sorted(set(chunks) - set(range(manifest.count)))
    if extra:
        raise DecodeError(Reason.BAD_CHUNK, f"{manifest.describe()}: chunks {_ranges(extra)} are not in the manifest")
    for index in range(manifest.count):
        manifest.check_chunk(index, chunks[index])
    return _join(manifest, [chunks[i] for i in range(manifest.count)])


def _join(manifest: Manifest, ordered: list[bytes]) -> bytes:
    if digest_of(manifest.hash, *ordered) != manifest.digest:
        raise DecodeError(Reason.BAD_CHUNK, f"{manifest.describe()}: every chunk matches but the whole does not match its hash")
    return b"".join(ordered)


def _ranges(indices: list[int]) -> str:
    shown = ", ".join(map(str, indices[:10]))
    return shown + (f" and {len(indices) - 10} more" if len(indices) > 10 else "")


@dataclass(frozen=True)
class ChunkLimits:
    """What one receiver accepts: per message, and all messages in flight together."""

    max_size: int  # bytes of one reassembled payload (the receiver's limit for that message)
    max_chunks: int = MAX_CHUNKS
    max_concurrent: int = 8  # partial messages held at once
    max_inflight_bytes: int = 512 * 1024 * 1024  # sum of their declared sizes (one message is always admitted)
    timeout: float = 60.0  # seconds without a new chunk after which a partial set is dropped

    def __post_init__(self) -> None:
        if min(self.max_size, self.max_chunks, self.max_concurrent, self.max_inflight_bytes) < 1 or not self.timeout > 0:
            raise ValueError(f"chunk limits must be positive: {self}")


@dataclass
class _Partial:
    manifest: Manifest
    deadline: float
    chunks: dict[int, bytes] = field(default_factory=dict)
    received: int = 0  # bytes held
    problem: str = ""  # the last bad chunk seen, for the incomplete report


@dataclass(frozen=True)
class Stalled:
    """A partial set dropped because no chunk came for ``limits.timeout`` seconds."""

    key: str
    manifest: Manifest
    received: int
    error: DecodeError  # reason INCOMPLETE


class Reassembler:
    """Collects the chunks of several messages at once, within ``limits``; pure, no I/O.

    Memory: at most the declared size of each message in flight (chunks are kept as received and
    joined once, when the last verified one arrives), and the sum of declared sizes stays within
    ``max_inflight_bytes``. A chunk that fails its check is never stored. ``key`` is the caller's
    name for a message (the chunk topics' base).
    """

    def __init__(self, limits: ChunkLimits, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.limits = limits
        self.clock = clock
        self._partials: dict[str, _Partial] = {}

    def __contains__(self, key: object) -> bool:
        return key in self._partials

    def __len__(self) -> int:
        return len(self._partials)

    def keys(self) -> list[str]:
        return list(self._partials)

    def manifest(self, key: str) -> Manifest:
        return self._partials[key].manifest

    def received(self, key: str) -> int:
        return self._partials[key].received

    @property
    def inflight_bytes(self) -> int:
        return sum(p.manifest.size for p in self._partials.values())

    def start(self, key: str, manifest: Manifest) -> bool:
        """Begin collecting ``manifest``'s chunks under ``key``; False if that very manifest is already
        being collected (nothing changes). A different manifest under the same key replaces it.
        Raises Busy when the limits leave no room, DecodeError(TOO_LARGE) for a manifest beyond them."""
        current = self._partials.get(key)
        if current is not None and current.manifest == manifest:
            return False
        if manifest.size > self.limits.max_size or manifest.count > self.limits.max_chunks:
            raise DecodeError(Reason.TOO_LARGE, f"{manifest.describe()} exceeds this receiver's limits "
                                                f"({self.limits.max_size} bytes, {self.limits.max_chunks} chunks)")
        others = [p for k, p in self._partials.items() if k != key]
        held = sum(p.manifest.size for p in others)
        if others and (len(others) >= self.limits.max_concurrent or held + manifest.size > self.limits.max_inflight_bytes):
            raise Busy(f"{len(others)} messages ({held} bytes) are being reassembled already")
        self._partials[key] = _Partial(manifest, self.clock() + self.limits.timeout)
        return True

    def add(self, key: str, index: int, data: bytes) -> bytes | None:
        """Store chunk ``index`` of ``key``; the whole payload once the set is complete, else None.

        Raises KeyError for an unknown key and DecodeError(BAD_CHUNK) for a chunk that does not
        match (it is not stored; the partial set stays as it was, unless the whole hash failed, in
        which case nothing can complete it and it is dropped).
        """
        partial = self._partials[key]
        try:
            partial.manifest.check_chunk(index, data)
        except DecodeError as exc:
            partial.problem = exc.detail
            raise
        if index in partial.chunks:
            return None  # a duplicate (a retained copy after a re-subscribe)
        partial.chunks[index] = data
        partial.received += len(data)
        partial.deadline = self.clock() + self.limits.timeout
        if len(partial.chunks) < partial.manifest.count:
            return None
        del self._partials[key]
        return _join(partial.manifest, [partial.chunks[i] for i in range(partial.manifest.count)])

    def drop(self, key: str) -> Manifest | None:
        partial = self._partials.pop(key, None)
        return partial.manifest if partial else None

    def next_deadline(self) -> float | None:
        return min((p.deadline for p in self._partials.values()), default=None)

    def expire(self) -> list[Stalled]:
        """Drop and return every partial set that made no progress for ``limits.timeout`` seconds."""
        now = self.clock()
        stalled = []
        for key, partial in list(self._partials.items()):
            if partial.deadline <= now:
                del self._partials[key]
                missing = [i for i in range(partial.manifest.count) if i not in partial.chunks]
                detail = (f"{partial.manifest.describe()}: {len(missing)} chunks ({_ranges(missing)}) still missing after "
                          f"{self.limits.timeout:g} s without progress" + (f"; last bad chunk: {partial.problem}" if partial.problem else ""))
                stalled.append(Stalled(key, partial.manifest, partial.received, DecodeError(Reason.INCOMPLETE, detail)))
        return stalled
