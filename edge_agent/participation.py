"""What this device does with an announcement: train (if invited), evaluate (if asked), or neither.

The announcement's ``cohort`` field (fedge_contract/cohort.py) names the invited devices and the
evaluators. A device outside the cohort does not train: its update would be refused as not
invited, after costing its battery. An announcement without a cohort invites everyone (an
aggregator without selection).

Evaluation asks little (one forward pass over the device's held-out split), but it loads the task
and torch like training does, so it waits for the same eligibility as training (charging, idle,
cool: the device's owner comes first). A request that is still waiting when a newer version is
asked for is replaced by the newer one; a device that never becomes eligible simply does not
report, which the aggregator's sample tolerates. Evaluations run beside training (their own task
in the agent's task group), in a child process or on the agent's worker thread, like training.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

from fedge_contract import GlobalModel, Topics
from fedge_contract.cohort import Participation
from fedge_contract.evaluation import EvalReport

log = logging.getLogger("fedge.agent")

__all__ = ["Announcement", "EvalOutcome", "Evaluations", "Plan", "plan"]


@dataclass(frozen=True)
class Plan:
    train: bool  # this device is in the round's cohort (or there is no cohort)
    evaluate: bool  # this device is asked to evaluate the announced model


class Announcement(Protocol):
    """What ``plan`` reads: a GlobalModel, or a GlobalDelta once it carries ``cohort`` too."""

    @property
    def fleet(self) -> str: ...
    @property
    def round(self) -> int: ...
    @property
    def model_version(self) -> int: ...
    @property
    def final(self) -> bool: ...
    @property
    def cohort(self) -> Participation | None: ...


def plan(model: Announcement, client_id: str) -> Plan:
    cohort = model.cohort
    if cohort is None:
        return Plan(train=not model.final, evaluate=False)
    return Plan(
        train=not model.final and cohort.invites(client_id, fleet=model.fleet, round_no=model.round),
        evaluate=cohort.asks_eval(client_id, fleet=model.fleet, model_version=model.model_version),
    )


@dataclass(frozen=True)
class EvalOutcome:
    """A device's evaluation of one model on its held-out split (torch-free, crosses the child's pipe)."""

    num_samples: int
    loss: float
    accuracy: float
    seconds: float


Evaluate = Callable[[GlobalModel, bytes], Awaitable[EvalOutcome | None]]  # None: no held-out data here
Publish = Callable[[str, bytes], Awaitable[None]]


class Evaluations:
    """The device's pending evaluation request and the loop that serves it (``run``, owned by the agent's task group)."""

    def __init__(self, client_id: str, topics: Topics, *, evaluate: Evaluate, publish: Publish,
                 wait_eligible: Callable[[], Awaitable[None]]) -> None:
        self.client_id = client_id
        self.topics = topics
        self._evaluate = evaluate
        self._publish = publish
        self._wait_eligible = wait_eligible
        self._pending: tuple[GlobalModel, bytes] | None = None
        self._wake = asyncio.Event()
        self._done_version = -1
        self._after: dict[int, Callable[[], None]] = {}  # version -> called once its request is served (or dropped)
        self.reports: list[EvalReport] = []  # what this device reported (stats, tests)

    def offer(self, model: GlobalModel, payload: bytes, *, then: Callable[[], None] | None = None) -> None:
        """Evaluate ``model`` once eligible (replacing an older request); ``then`` runs when that is done."""
        if then is not None:
            self._after[model.model_version] = then
        if model.model_version <= self._done_version:
            self._finish(model.model_version)
            return
        if self._pending is not None and self._pending[0].model_version < model.model_version:
            self._finish(self._pending[0].model_version)  # superseded: never evaluated
        self._pending = (model, payload)
        self._wake.set()

    async def run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            if self._pending is None:
                continue
            await self._wait_eligible()
            if self._pending is None:
                continue
            model, payload = self._pending
            try:
                await self._serve(model, payload)
            finally:
                if self._pending is not None and self._pending[0] is model:
                    self._pending = None
                self._done_version = max(self._done_version, model.model_version)
                self._finish(model.model_version)

    async def _serve(self, model: GlobalModel, payload: bytes) -> None:
        started = time.monotonic()
        try:
            outcome = await self._evaluate(model, payload)
        except Exception as exc:  # a task that fails to evaluate must not stop the agent: say so and go on
            log.error("%s: evaluating v%d failed: %s", self.client_id, model.model_version, exc)
            return
        if outcome is None or outcome.num_samples < 1:
            log.info("%s: asked to evaluate v%d, but this device has no held-out data", self.client_id, model.model_version)
            return
        try:
            report = EvalReport(model.fleet, self.client_id, model.model_version, outcome.num_samples, outcome.loss,
                                outcome.accuracy, max(outcome.seconds, 0.0))
        except ValueError as exc:  # e.g. a loss that overflowed: nothing the aggregator could use
            log.error("%s: evaluation of v%d is unusable: %s", self.client_id, model.model_version, exc)
            return
        await self._publish(self.topics.evals(self.client_id), report.to_bytes())
        self.reports.append(report)
        log.info("%s: evaluated v%d on %d samples: accuracy %.4f, loss %.4f (%.2f s)", self.client_id, model.model_version,
                 outcome.num_samples, outcome.accuracy, outcome.loss, time.monotonic() - started)

    def _finish(self, version: int) -> None:
        callback = self._after.pop(version, None)
        if callback is not None:
            callback()
