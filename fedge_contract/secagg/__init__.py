"""Secure aggregation (SecAgg+, Bell et al. 2020, after Bonawitz et al. 2017) for fedge's synchronous rounds.

The aggregator learns the sum of a cohort's fixed-point deltas and nothing about any one of them,
even when devices drop out at any phase, up to the threshold. This package is the protocol only,
pure and without transport: the primitives (``crypto``, ``shamir``, ``prg``, ``ring``, ``graph``,
``fixedpoint``), the eight messages (``messages``), and the two state machines (``device``,
``server``). DESIGN.md in this folder describes the phases, the MQTT topics and ACL they are meant
for, dropouts, restarts, the parameters we recommend and what the feature must refuse.

It imports neither program, and nothing beyond numpy, msgpack and ``cryptography``.
"""

from fedge_contract.secagg.device import DevicePhase, DevicePolicy, DeviceSession
from fedge_contract.secagg.errors import ParameterError, ProtocolError, ResumeError
from fedge_contract.secagg.fixedpoint import FixedPoint, Weighting
from fedge_contract.secagg.messages import (
    DeviceMessage,
    KeyAdvert,
    KeyList,
    MaskedInput,
    Reveal,
    ServerMessage,
    Setup,
    ShareBundle,
    Shares,
    UnmaskRequest,
)
from fedge_contract.secagg.ring import Ring
from fedge_contract.secagg.server import Abandoned, Aggregate, Phase, PhaseTimeouts, ServerSession, Step, new_session_id

__all__ = [
    "Abandoned",
    "Aggregate",
    "DeviceMessage",
    "DevicePhase",
    "DevicePolicy",
    "DeviceSession",
    "FixedPoint",
    "KeyAdvert",
    "KeyList",
    "MaskedInput",
    "ParameterError",
    "Phase",
    "PhaseTimeouts",
    "ProtocolError",
    "ResumeError",
    "Reveal",
    "Ring",
    "ServerMessage",
    "ServerSession",
    "Setup",
    "ShareBundle",
    "Shares",
    "Step",
    "UnmaskRequest",
    "Weighting",
    "new_session_id",
]
