"""How the aggregator broadcasts: the delta chain, and when it takes a keyframe.

Two kinds of keyframe, chosen by the keyframe chain:

- **snapshot** (a lossless chain: ``none``, ``zstd``, ``lz4``, ``flat+zstd``): a copy of the held
  model, retained on ``global/key`` for devices that catch up. It decodes to the held model
  exactly, so devices that follow the deltas never download it and the delta chain goes on.
- **reset** (a lossy chain: ``f16+zstd``, ``q8+zstd``, ...): the version's broadcast is the full
  model in that chain, every device downloads it, and the held model becomes the *decoded*
  keyframe (so both sides agree); what the lossy chain lost is carried by the next deltas.

A keyframe is taken ``every`` versions at the latest, sooner once the deltas retained since the
last one weigh ``ratio`` times the keyframe (bytes of tensor data): that bounds what a device that
catches up downloads (``worst_case_catch_up_bytes``) without a fixed K tuned per model size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from fedge_contract.codecs import CodecChain, CodecError, parse_chain

__all__ = ["DEFAULT_BROADCAST_CHAIN", "BroadcastPolicy", "worst_case_catch_up_bytes"]

# bench/codecs.py part 3 (digits, 20 devices, 30 rounds, seeds 0-2): ~510-byte broadcasts (Rice-coded positions,
# one bit a value: the server's error feedback carries what the sign leaves out); with the default uploads
# ~56-60x fewer bytes than float32 both ways to 0.90, within 0.3-0.8 points of uncompressed. topk:0.03 saves
# ~15% of the downloads but ends 0.8 points below; q4 values cost ~45% more bytes for no faster rounds.
DEFAULT_BROADCAST_CHAIN = "flat+topk:0.05+rice+sign"
SNAPSHOT_CHAIN = "flat+zstd"  # the lossless keyframe of a hold (devices built the model; see BroadcastEncoder.begin)


@dataclass(frozen=True)
class BroadcastPolicy:
    chain: str = DEFAULT_BROADCAST_CHAIN  # codec of the deltas: any chain the uploads support
    keyframe_chain: str = SNAPSHOT_CHAIN  # lossless: snapshots; lossy: resets (module docstring)
    every: int = 30  # K: at most this many versions from one keyframe to the next
    ratio: float | None = 0.5  # a keyframe once the retained deltas outweigh ratio x the keyframe; None: only every K
    seed: int = 0  # the stochastic rounding of the broadcasts (per version, so restarts do not change it)

    def __post_init__(self) -> None:
        for text in (self.chain, self.keyframe_chain):
            try:
                parse_chain(text)
            except CodecError as exc:
                raise ValueError(f"broadcast codec {text!r}: {exc}") from None
        if self.every < 1:
            raise ValueError(f"keyframes every {self.every} versions: need at least 1")
        if self.ratio is not None and not (self.ratio > 0 and math.isfinite(self.ratio)):
            raise ValueError(f"keyframe ratio must be positive, got {self.ratio}")

    @property
    def delta_chain(self) -> CodecChain:
        return parse_chain(self.chain)

    @property
    def key_chain(self) -> CodecChain:
        return parse_chain(self.keyframe_chain)

    @property
    def resets(self) -> bool:
        """Whether keyframes are resets that every device downloads (a lossy keyframe chain)."""
        return self.key_chain.lossy


def worst_case_catch_up_bytes(keyframe_bytes: int, max_delta_bytes: int, policy: BroadcastPolicy, envelope_bytes: int = 0) -> int:
    """The most a device downloads to catch up from nothing: the keyframe and every retained delta.

    ``keyframe_bytes`` and ``max_delta_bytes`` are tensor data (``Keyframe.nbytes``,
    ``Broadcast.nbytes``: what the ratio rule weighs); ``envelope_bytes`` is the most a message
    adds to its tensor data (~300 bytes for the digits model). After keyframe ``k``, version ``v``
    is not a keyframe only while ``v - k < every`` and the deltas ``k+1 .. v-1`` weigh less than
    ``ratio x keyframe``; the catch-up is the keyframe plus the deltas ``k+1 .. v`` (the last one
    is the announcement itself), at most ``every - 1`` messages, so with E = envelope_bytes:

        keyframe + E + min((every - 1) x (max_delta + E), ratio x keyframe + max_delta + (every - 1) x E)

    A device that still holds a version at or after ``k`` needs the deltas only (at most the min).
    """
    count = policy.every - 1
    by_count = count * (max_delta_bytes + envelope_bytes)
    catch_up = keyframe_bytes + envelope_bytes
    if policy.ratio is None:
        return catch_up + by_count
    by_weight = math.ceil(policy.ratio * keyframe_bytes) + max_delta_bytes + count * envelope_bytes
    return catch_up + min(by_count, by_weight)
