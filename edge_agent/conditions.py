"""When the device may train: the eligibility gate the training loop consults.

The gate is asked before training starts (``wait_eligible``) and between batches
(``eligible``), so a device that stops being eligible stops cleanly between two steps.
"""

from __future__ import annotations

from typing import Protocol


class Gate(Protocol):
    def eligible(self) -> bool:
        """Cheap, thread-safe check, called between training batches."""
        ...

    async def wait_eligible(self) -> None:
        """Return once the device may train."""
        ...

    def why_not(self) -> str:
        """Human-readable reason the device is not eligible ('' when it is)."""
        ...


class AlwaysEligible:
    """For simulations and mains-powered servers: train whenever there is work."""

    def eligible(self) -> bool:
        return True

    async def wait_eligible(self) -> None:
        return None

    def why_not(self) -> str:
        return ""
