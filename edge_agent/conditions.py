"""When the device may train: the eligibility gate the training loop consults.

The gate is asked before training starts (``wait_eligible``) and between batches
(``eligible``), so a device that stops being eligible stops cleanly between two steps.
A gate may also offer ``device()`` (its last readings, for presence) and ``wait_change()``
(returns when eligibility flips, or when a reading starts or stops failing): the agent then
re-publishes its presence and stops a training child without polling.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from datetime import datetime
from typing import Any, Protocol, Self

from edge_agent.policy import Policy
from edge_agent.probes import DeviceProbe, DeviceSnapshot
from fedge_contract.aio import cancel_and_wait

log = logging.getLogger("fedge.conditions")


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


class PolicyGate:
    """The device's policy applied to its probes, re-read on a timer of seconds.

    An async context manager: entering takes a first reading and starts one sampling task,
    leaving cancels it. ``eligible()`` only reads the last decision (cheap and thread-safe:
    one reference read), so the training loop may ask between every batch. Nothing polls
    faster than ``sample_seconds``; a waiting agent wakes the CPU once per sample.
    """

    def __init__(
        self,
        policy: Policy,
        probe: DeviceProbe,
        *,
        sample_seconds: float = 10.0,
        clock: Callable[[], datetime] = datetime.now,
    ) -> None:
        if sample_seconds <= 0:
            raise ValueError("sample_seconds must be > 0")
        self.policy = policy
        self.probe = probe
        self.sample_seconds = sample_seconds
        self._clock = clock
        self._reasons: tuple[str, ...] = ("not measured yet",)
        self._snapshot: DeviceSnapshot | None = None
        self._eligible = asyncio.Event()
        self._changed = asyncio.Event()  # eligibility flipped (or a reading started/stopped failing) since wait_change last returned
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Self:
        await self.refresh()
        self._task = asyncio.create_task(self._sample_forever(), name="gate-sampler")
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if self._task is not None:
            await cancel_and_wait([self._task])
            self._task = None

    async def _sample_forever(self) -> None:
        # The CPU meter needs two samples to know the load: take the second one soon.
        first = min(2.0, self.sample_seconds) if self.snapshot_needs_load() else self.sample_seconds
        await asyncio.sleep(first)
        while True:
            await self.refresh()
            await asyncio.sleep(self.sample_seconds)

    def snapshot_needs_load(self) -> bool:
        """Whether to wait for the meter's second sample (not while it fails: unknown never blocks)."""
        return self.policy.max_cpu_load is not None and self.probe.cpu is not None and (
            self._snapshot is None or (self._snapshot.cpu_load is None and "cpu_load" not in self._snapshot.unknown)
        )

    async def refresh(self) -> bool:
        """Read the probes now (in a thread: termux's tool can take a second); True if eligible."""
        snapshot = await asyncio.to_thread(self.probe.read)
        unknown_changed = self._snapshot is not None and set(snapshot.unknown) != set(self._snapshot.unknown)
        self._snapshot = snapshot
        reasons = self.policy.reasons(snapshot, self._clock())
        if self.snapshot_needs_load():
            reasons.append("measuring the CPU load")
        self._set(tuple(reasons), notify=unknown_changed)
        return not reasons

    def _set(self, reasons: tuple[str, ...], *, notify: bool = False) -> None:
        """Record the decision; wake ``wait_change`` when eligibility flips (or ``notify``: a reading
        started or stopped failing, which presence should show)."""
        was = self._reasons
        self._reasons = reasons
        if reasons:
            self._eligible.clear()
        else:
            self._eligible.set()
        if bool(was) != bool(reasons):
            log.info("device %s", "eligible" if not reasons else "not eligible: " + "; ".join(reasons))
        if bool(was) != bool(reasons) or notify:
            self._changed.set()

    def eligible(self) -> bool:
        return not self._reasons

    async def wait_eligible(self) -> None:
        await self._eligible.wait()

    def why_not(self) -> str:
        return "; ".join(self._reasons)

    def device(self) -> dict[str, Any]:
        """The last snapshot as flat scalars (for presence and updates)."""
        return self._snapshot.as_dict() if self._snapshot is not None else {}

    async def wait_change(self) -> None:
        """Return once eligibility flipped, or the readings that fail changed, since the last return.

        Changes in between coalesce and none is missed: the caller reads the state when this returns.
        A flip while the caller was busy (publishing the previous one) used to be lost, and a device
        replugged meanwhile stayed "not eligible" in its presence (seen under load in test_gating).
        """
        await self._changed.wait()
        self._changed.clear()
