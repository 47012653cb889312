"""The contract both fedge programs speak: topics, messages, tensor encoding and codecs.

This package imports neither the agent nor the aggregator, and not torch: a tool that only
reads the wire (a status viewer, a load generator, a third-party agent) can depend on it alone.
"""

from fedge_contract.errors import ContractError, DecodeError, Reason
from fedge_contract.messages import (
    SCHEMA_VERSION,
    GlobalModel,
    Presence,
    Receipt,
    ReceiptStatus,
    RoundState,
    RoundStatus,
    TaskConfig,
    Update,
    new_update_id,
)
from fedge_contract.topics import Topics

__all__ = [
    "SCHEMA_VERSION",
    "ContractError",
    "DecodeError",
    "GlobalModel",
    "Presence",
    "Reason",
    "Receipt",
    "ReceiptStatus",
    "RoundState",
    "RoundStatus",
    "TaskConfig",
    "Topics",
    "Update",
    "new_update_id",
]
