"""Errors of the wire contract and of the MQTT connection.

    ContractError            anything fedge_contract raises
     +-- DecodeError         bytes from the wire that are not a valid message (carries a Reason)
     +-- CodecError          a codec chain that cannot be parsed or is ill-ordered
     +-- ConnectionLost      an MQTT operation cut off: the broker was unreachable, refused us, or
     |                       the connection dropped before its ack (retry: fedge messages are idempotent)
     +-- ConnectionFailed    a Connection that stopped for good; ``cause`` is the error that stopped it
                             (an on_connect that raised, a bug), not a network problem

A DecodeError is never a crash: the receiver turns it into a rejection receipt whose reason is
``f"{reason.value}: {detail}"``, so the sender learns what to fix.

aiomqtt's ``MqttError`` never leaves fedge_contract: it is translated into ConnectionLost where
fedge calls aiomqtt. A ``Connection`` heals ConnectionLost itself (it reconnects and retries), so
its callers only ever see ConnectionFailed; a raw client from ``make_client`` raises ConnectionLost.
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
    # secure aggregation (fedge_contract/secagg): messages that decode but break the protocol
    WRONG_SESSION = "wrong_session"  # for another round or protocol session
    WRONG_PHASE = "wrong_phase"  # not expected in the phase the protocol is in
    NOT_IN_ROUND = "not_in_round"  # from or about a device that is not (or no longer) taking part
    CONFLICT = "conflict"  # a second, different message where one was already taken
    GRAPH_MISMATCH = "graph_mismatch"  # peers that are not the ones the neighbourhood graph names
    WRONG_RECIPIENT = "wrong_recipient"  # addressed to another device
    UNAUTHENTIC = "unauthentic"  # a ciphertext or key that fails authentication
    UNSAFE_REQUEST = "unsafe_request"  # answering it could reveal a device's own input
    BAD_SHARE = "bad_share"  # secret shares that do not reconstruct what was committed
    BELOW_THRESHOLD = "below_threshold"  # fewer devices or shares than the threshold needs
    BASE_MISMATCH = "base_mismatch"  # a delta broadcast for a model this device does not hold (a gap): catch up
    HASH_MISMATCH = "hash_mismatch"  # a rebuilt model whose hash is not the one its broadcast carries: catch up
    NOT_INVITED = "not_invited"  # an update from a device the round's cohort did not invite (fedge_contract/cohort.py)
    SECURE_ROUND = "secure_round"  # an Update in the clear where the round sums masked inputs only (secure aggregation)


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


class ConnectionLost(ContractError):
    """An MQTT operation that the network cut off (connect refused or unreachable, a drop before the ack)."""


class ConnectionFailed(ContractError):
    """A Connection that has failed for good: every pending and later operation on it raises this.

    ``cause`` (also ``__cause__``) is what stopped it; the owner's ``async with`` raises the cause itself.
    """

    def __init__(self, identifier: str, cause: BaseException) -> None:
        super().__init__(f"MQTT connection {identifier!r} stopped for good: {cause!r}")
        self.identifier = identifier
        self.cause = cause
        self.__cause__ = cause
