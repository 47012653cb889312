"""What becomes of an update no receipt answered: dropped on purpose, said at WARNING, counted (issue 19).

An update stays in the agent's outbox until its receipt comes. Two things end that wait without one:

- a newer round opens (in async mode: the update is more than ``max_staleness`` versions old):
  its round is over and no aggregator will take it;
- the final model: training is over. The last round's receipts may still come (the aggregator
  sends its queued receipts before it exits), so the outbox gets ``grace`` seconds to empty
  through them; whatever is still unanswered then is dropped.

Each dropped update is one WARNING line (its id and round) and one more in the device's count of
dropped updates. The count is kept in the agent's state file (it survives restarts) and travels
in the device's retained presence, where ``fedge status`` and the aggregator read it. So an
update a device trained while its round was open ends up accepted, answered with a reason, or
counted as dropped: never lost silently.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from edge_agent.outbox import Outbox, PendingUpdate
from edge_agent.state import AgentState

OnDisk = Callable[..., Awaitable[Any]]  # Agent._on_disk: a file operation on a thread, in the order asked
log = logging.getLogger("fedge.agent")


class Settlement:
    """The agent's unanswered updates: dropped when their round is over, settled on the final model.

    ``forget(update_id)`` tells the agent an update needs no more sending (it empties its chunk
    topics); ``announce()`` republishes the device's presence, which carries the count.
    """

    def __init__(
        self, client_id: str, outbox: Outbox, state: AgentState, state_path: Path, *,
        on_disk: OnDisk, forget: Callable[[str], None], announce: Callable[[], Awaitable[None]], grace: float,
    ) -> None:
        self.client_id = client_id
        self.grace = grace
        self._outbox = outbox
        self._state = state
        self._state_path = state_path
        self._on_disk = on_disk
        self._forget = forget
        self._announce = announce
        self._final = False  # the newest model is the final one
        self._final_arrived = asyncio.Event()
        self._answered = asyncio.Event()

    @property
    def dropped(self) -> int:
        """Updates this device dropped unanswered, ever."""
        return self._state.dropped_updates

    async def round_over(self, before_round: int) -> None:
        """A model for a newer round arrived: drop the updates of rounds before ``before_round``."""
        dropped = await self._on_disk(self._outbox.drop, lambda pending: pending.round < before_round)
        await self._count(dropped, "its round is over")

    def on_model(self, *, final: bool) -> None:
        """Every global model the agent accepts: a final one starts the settlement (``run``)."""
        self._final = final
        if final:
            self._final_arrived.set()

    def answered(self) -> None:
        """A receipt removed an update from the outbox."""
        self._answered.set()

    async def run(self, on_settled: Callable[[], None]) -> None:
        """Settle the outbox each time the final model arrives, then call ``on_settled``.

        Runs as long as the agent (its task group owns it). A non-final model that arrives during
        the grace means a new run began: its rounds decide, nothing is dropped here.
        """
        while True:
            await self._final_arrived.wait()
            self._final_arrived.clear()
            await self._receipts_or_grace()
            if not self._final:
                continue
            await self._count(await self._on_disk(self._outbox.drop, lambda pending: True), "training is over")
            on_settled()

    async def _receipts_or_grace(self) -> None:
        """Until the outbox is empty (every update answered), or ``grace`` seconds."""
        try:
            async with asyncio.timeout(self.grace):
                while True:
                    self._answered.clear()  # before looking: a receipt that lands meanwhile wakes the wait
                    if not await self._on_disk(self._outbox.pending):
                        return
                    await self._answered.wait()
        except TimeoutError:
            pass

    async def _count(self, dropped: list[PendingUpdate], why: str) -> None:
        if not dropped:
            return
        for pending in dropped:
            log.warning("%s: dropped update %s of round %d unanswered: %s", self.client_id, pending.update_id, pending.round, why,
                        extra={"client": self.client_id, "update": pending.update_id, "round": pending.round, "reason": why})
            self._forget(pending.update_id)
        self._state.dropped_updates += len(dropped)
        await self._on_disk(self._state.save, self._state_path)
        await self._announce()
