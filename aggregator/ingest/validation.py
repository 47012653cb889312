"""Turning untrusted update bytes into a trusted delta, or a Rejection with a reason.

Every check that does not depend on the round's state lives here: size, strict decode, fleet,
the sender's identity (the client id inside must be the one in the topic: no device speaks for
another), the tensor set and shapes, finiteness. Round-dependent checks (stale, duplicate) are
the round's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from aggregator.errors import Rejection
from fedge_contract import DecodeError, ReceiptStatus, Update
from fedge_contract.codecs import decode_weights
from fedge_contract.tensors import ModelSpec

if TYPE_CHECKING:
    from aggregator.config import AggregatorConfig


@dataclass(frozen=True)
class UpdateLimits:
    max_bytes: int
    max_num_samples: int = 10_000_000
    allowed_clients: frozenset[str] | None = None  # None: no allowlist

    @classmethod
    def for_model(cls, spec: ModelSpec, max_bytes: int | None = None, **limits: Any) -> UpdateLimits:
        """By default allow an uncompressed float32 delta plus generous framing."""
        return cls(max_bytes=max_bytes or (spec.nbytes * 5 // 4 + 64 * 1024), **limits)


def limits_for(config: AggregatorConfig, spec: ModelSpec) -> UpdateLimits:
    """The validation limits of an aggregator's config (the same in the aggregator and its workers)."""
    return UpdateLimits.for_model(spec, config.ingest.max_update_bytes, max_num_samples=config.defence.max_num_samples,
                                  allowed_clients=config.defence.allowed_clients)


def parse_update(payload: bytes, *, topic_client: str, fleet: str, limits: UpdateLimits) -> Update:
    """Strictly decode the envelope (tensors stay encoded until the round wants them)."""
    if limits.allowed_clients is not None and topic_client not in limits.allowed_clients:
        # checked before decoding: a device that is not in the fleet costs no decode work
        raise Rejection(ReceiptStatus.REJECTED, f"unknown_client: {topic_client!r} is not in the aggregator's allowlist")
    try:
        update = Update.from_bytes(payload, max_bytes=limits.max_bytes, fleet=fleet)
    except DecodeError as exc:
        raise Rejection(ReceiptStatus.REJECTED, str(exc)) from None
    if update.client_id != topic_client:
        raise Rejection(
            ReceiptStatus.REJECTED,
            f"client_mismatch: update says client {update.client_id!r} but was published on {topic_client!r}'s topic",
        )
    if update.num_samples > limits.max_num_samples:
        raise Rejection(ReceiptStatus.REJECTED, f"bad_value: num_samples {update.num_samples} exceeds {limits.max_num_samples}")
    return update


def decode_delta(update: Update, spec: ModelSpec) -> dict[str, np.ndarray]:
    """The dense float32 delta; shape, codec or NaN/Inf problems become a Rejection."""
    try:
        return decode_weights(update.tensors, spec)
    except DecodeError as exc:
        raise Rejection(ReceiptStatus.REJECTED, str(exc)) from None
