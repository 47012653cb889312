"""Errors of the secure-aggregation protocol, under fedge_contract's root.

    ContractError
     +-- DecodeError
     |    +-- ProtocolError     a message that decodes but that the protocol refuses (carries a Reason)
     +-- ParameterError         protocol parameters or a local input that cannot work (a caller's bug)
     +-- ResumeError            a saved server state that cannot be resumed: start a new session

A ProtocolError is a DecodeError so that the code that turns refusals into receipts, logs and
metrics handles both alike; the state machine that raised it has not changed its state.
"""

from __future__ import annotations

from fedge_contract.errors import ContractError, DecodeError, Reason


class ProtocolError(DecodeError):
    """A well-formed message the protocol refuses; ``sender`` names who sent it, when known."""

    def __init__(self, reason: Reason, detail: str, *, sender: str | None = None) -> None:
        super().__init__(reason, detail)
        self.sender = sender


class ParameterError(ContractError, ValueError):
    """Parameters (or a device's own input) outside what the protocol supports; the message says which."""


class ResumeError(ContractError):
    """A server snapshot (or its spooled masked inputs) that cannot be resumed; abandon the session."""
