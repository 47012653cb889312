"""The agent's hook for secure-aggregation rounds, and what it does on a device that cannot take part.

Secure aggregation needs the ``cryptography`` package (X25519, ChaCha20-Poly1305, HKDF), which a
device's base install leaves out (deploy/pi/install.sh installs fedge without extras; the
``secagg`` extra brings it: ``pip install 'fedge[secagg]'``). So the agent imports nothing of the
protocol itself: ``secure_aggregation(...)`` gives it the real module
(edge_agent/secure_aggregation.py) when the package is there, and ``Unavailable`` when it is not.
``Unavailable`` still recognises a secure round, so the device never sends its delta in the clear
there: it sits the round out, logs why once per round, and says so in its presence.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from fedge_contract import GlobalModel
from fedge_contract.tensors import ModelSpec

log = logging.getLogger("fedge.agent.secagg")
# fedge_contract/secagg/announcement.py's key, repeated so that a device without the protocol's
# dependencies can still tell a secure round (tests/agent/test_secure_aggregation.py checks they are equal)
EXTRA_KEY = "secure_aggregation"


def is_secure(model: GlobalModel) -> bool:
    """Whether ``model``'s round asks for secure aggregation (even malformed: never fall back to a plain Update)."""
    return EXTRA_KEY in model.task.extra


class SecureHook(Protocol):
    """What the agent calls: the real module, or ``Unavailable``."""

    def subscriptions(self) -> list[str]: ...

    def owns(self, topic: str) -> bool: ...

    def attach(self, publisher: Any, spec: ModelSpec) -> None: ...

    def presence_fields(self) -> dict[str, str]: ...

    async def on_announcement(self, model: GlobalModel) -> None: ...

    async def on_message(self, topic: str, payload: bytes) -> None: ...

    async def submit(self, model: GlobalModel, delta: Mapping[str, np.ndarray], num_samples: int) -> None: ...


class Unavailable:
    """Stands in for the module on a device without ``cryptography``: every secure round is sat out, saying why."""

    def __init__(self, client_id: str, reason: str, on_change: Callable[[], Awaitable[None]] | None = None) -> None:
        self.client_id = client_id
        self.reason = reason
        self._on_change = on_change
        self._status = ""
        self._reported: int | None = None  # the last round reported

    def subscriptions(self) -> list[str]:
        return []

    def owns(self, topic: str) -> bool:
        return False

    def attach(self, publisher: Any, spec: ModelSpec) -> None:
        pass

    def presence_fields(self) -> dict[str, str]:
        return {"secagg": self._status} if self._status else {}

    async def on_announcement(self, model: GlobalModel) -> None:
        if not is_secure(model) or self._reported == model.round:
            return
        self._reported = model.round
        self._status = f"sits out secure round {model.round}: {self.reason}"
        log.warning("%s: %s", self.client_id, self._status, extra={"client": self.client_id, "round": model.round})
        if self._on_change is not None:
            await self._on_change()

    async def on_message(self, topic: str, payload: bytes) -> None:
        pass

    async def submit(self, model: GlobalModel, delta: Mapping[str, np.ndarray], num_samples: int) -> None:
        """The delta of a secure round this device cannot take part in: dropped, never sent in the clear."""


def secure_aggregation(
    *, fleet: str, client_id: str, state_dir: Path, max_message_bytes: int, seed: int,
    on_change: Callable[[], Awaitable[None]] | None = None,
) -> SecureHook:
    """The secure-aggregation module, or ``Unavailable`` when this install lacks its dependencies."""
    try:
        from edge_agent.secure_aggregation import SecureAggregation
    except ImportError as exc:
        reason = f"secure aggregation needs the 'cryptography' package ({exc}); install it with pip install 'fedge[secagg]'"
        return Unavailable(client_id, reason, on_change)
    return SecureAggregation(fleet=fleet, client_id=client_id, state_dir=state_dir, max_message_bytes=max_message_bytes, seed=seed,
                             on_change=on_change)
