"""Errors of the wire contract.

    ContractError            anything the contract refuses
     +-- DecodeError         bytes from the wire that are not a valid message (carries a Reason)
     +-- CodecError          a codec chain that cannot be parsed or is ill-ordered

A DecodeError is never a crash: the receiver turns it into a rejection receipt whose reason is
``f"{reason.value}: {detail}"``, so the sender learns what to fix.
"""

from __future__ import annotations

import enum


class Reason(str, enum.Enum):
    """Why a message was refused; the value is the stable, machine-readable part of a receipt."""

    TOO_LARGE = "too_large"
    MALFORMED = "malformed"
    SCHEMA = "schema"
    MISSING_FIELD = "missing_field"
    WRONG_TYPE = "wrong_type"
    BAD_VALUE = "bad_value"
    BAD_TENSOR = "bad_tensor"
    SHAPE_MISMATCH = "shape_mismatch"
    NON_FINITE = "non_finite"
    WRONG_FLEET = "wrong_fleet"
    CLIENT_MISMATCH = "client_mismatch"
    CODEC = "codec"
    FINGERPRINT = "fingerprint"
    BAD_CHUNK = "bad_chunk"  # a chunk whose size or hash is not the one its manifest lists
    INCOMPLETE = "incomplete"  # a chunked message whose chunks did not all arrive in time
    BASE_MISMATCH = "base_mismatch"  # a delta broadcast for a model this device does not hold (a gap): catch up
    HASH_MISMATCH = "hash_mismatch"  # a rebuilt model whose hash is not the one its broadcast carries: catch up


class ContractError(Exception):
    """Root of every error raised by fedge_contract."""


class DecodeError(ContractError):
    """A payload that breaks the contract; ``reason`` says which rule, ``detail`` says where."""

    def __init__(self, reason: Reason, detail: str) -> None:
        super().__init__(f"{reason.value}: {detail}")
        self.reason = reason
        self.detail = detail


class CodecError(ContractError):
    """A codec chain string that names an unknown stage or puts stages in an impossible order."""
