"""Delta broadcasts in the round loop (issue 16): each new version as a delta from the model devices hold.

The channel owns a Broadcaster (broadcaster.py) and drives it as the coordinator's versions come:

- **Begin.** A new store begins at version 0 with a *hold* (``initial``): every device builds that
  model from the task's seed and checks its hash; the state goes into version 0's checkpoint
  transaction. A resumed store takes up the state committed with the checkpoint it resumes
  (``resume``: ``Broadcaster.from_state``, which rebuilds the held model from the keyframe and
  retained deltas and checks every hash) and republishes it at the first announcement, so devices
  keep following with the deltas they already hold. A state that is missing (a store written
  before delta broadcasts) or unusable begins afresh at that version: a full keyframe that every
  device downloads once (at version 0 a hold again), committed alone before it is published.
- **Each version.** ``prepare`` advances the broadcaster with the new true model and packs its
  state on a worker thread (encoding a delta, moving the held model, hashing it: whole-model work);
  the coordinator commits that state with the checkpoint; ``announce`` then publishes the version
  (the task, a keyframe, the retained copy, the announcement, then what it made obsolete).
- **Again.** A re-announcement of the same version (an extension, a grace, the final model)
  re-sends the same bytes with the new round fields; after a resume or a broker reconnect
  (``lost_retained``) everything retained is published again from the stored bytes.
- **Keyframes on demand.** Devices report catch-up failures in their presence; enough of them
  request a keyframe at the next version (failures.py), and the next announcement puts everything
  retained back (the task included), as after a reconnect.

What devices hold (``Prepared.held``) is what the server evaluates as the round's accuracy: the model
the fleet runs, not the true model the checkpoint keeps (aggregator/model.py evaluates both).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING

from aggregator.broadcasting.broadcaster import Broadcaster, Sent
from aggregator.broadcasting.channel import Announced, Prepared, Weights
from aggregator.broadcasting.failures import CatchUpFailures
from aggregator.store import BroadcastState, Store, StoreAccess, call
from fedge_contract import DecodeError, Presence, Topics
from fedge_contract.broadcast import Step
from fedge_contract.mqtt import Connection

if TYPE_CHECKING:
    from aggregator.config import AggregatorConfig
    from aggregator.model import GlobalModel
    from aggregator.observability.fleet import FleetView
    from aggregator.observability.metrics import AggregatorMetrics

log = logging.getLogger("fedge.aggregator.broadcast")


class DeltaBroadcasts:
    def __init__(self, config: AggregatorConfig, model: GlobalModel, metrics: AggregatorMetrics, fleet: FleetView) -> None:
        self.config = config
        self.model = model
        self.metrics = metrics
        self.fleet = fleet
        self.topics = Topics(config.fleet)
        self.policy = config.broadcast.policy
        self.max_message_bytes = config.ingest.max_message_bytes
        self.broadcaster = Broadcaster(None, self.topics, model.spec, self.policy, max_message_bytes=self.max_message_bytes)
        self.failures = CatchUpFailures()
        self._pending: Step | None = None  # the version prepared and committed, not yet published
        self._republish = False  # put everything retained back at the next announcement (a resume, a reconnect)
        fleet.watch(self._on_presence)

    @property
    def held(self) -> Weights:
        """The model devices hold at the current version."""
        return self.broadcaster.held

    # ------------------------------------------------------------------ beginning
    async def initial(self, weights: Weights) -> BroadcastState:
        self._pending, state = await asyncio.to_thread(self._begin, weights, 0, True)
        self.metrics.broadcast_keyframe()  # the snapshot of version 0, for devices whose build differs
        log.info("delta broadcasts: version 0 is a hold (devices build it), deltas in %s, keyframes %s every %d",
                 self.policy.chain, self.policy.keyframe_chain, self.policy.every)
        return state

    async def resume(self, db: StoreAccess) -> None:
        if self.broadcaster.started:
            return  # a new store: ``initial`` began at version 0
        version = self.model.version
        state: BroadcastState | None = await call(db, Store.broadcast_state, version)
        problem = "none was stored with it"
        if state is not None:
            try:
                self.broadcaster = await asyncio.to_thread(  # rebuilds and hashes the held model: off the loop
                    Broadcaster.from_state, None, self.topics, self.model.spec, self.policy, state, max_message_bytes=self.max_message_bytes)
            except DecodeError as exc:
                problem = f"it is unusable ({exc})"
            else:
                self._republish = True
                log.info("delta broadcasts: resumed at v%d (keyframe v%d, %d retained deltas); republishing them",
                         version, self.broadcaster.encoder.keyframe.version, len(self.broadcaster.encoder.retained))
                return
        hold = version == 0
        self._pending, fresh = await asyncio.to_thread(self._begin, self.model.weights, version, hold)
        await call(db, Store.save_broadcast, fresh)
        self.metrics.broadcast_keyframe()
        log.warning("delta broadcasts: no usable broadcast state for checkpoint v%d (%s): beginning afresh with %s", version, problem,
                    "a hold (devices build version 0)" if hold else "a full keyframe every device downloads once")

    def _begin(self, weights: Weights, version: int, hold: bool) -> tuple[Step, BroadcastState]:
        step = self.broadcaster.begin(weights, version, devices_hold=hold)
        if version > 0:  # what the lost state retained on global/delta/<u> is named by no announcement of this one
            self.broadcaster.clear_retained_deltas(range(max(1, version - self.policy.every + 1), version + 1))
        return step, self.broadcaster.state()

    def bind(self, conn: Connection) -> None:
        self.broadcaster.bind(conn)

    # ------------------------------------------------------------------ versions
    async def prepare(self, weights: Weights, version: int) -> Prepared:
        if self._pending is not None:  # a version that never went out (not the coordinator's order): publish everything next
            self._republish = True
        started = time.perf_counter()
        step, state = await asyncio.to_thread(self._advance, weights, version)
        self._pending = step
        if step.keyframe is not None:
            self.failures.keyframe_taken()
            self.metrics.broadcast_keyframe()
        self.metrics.broadcast_prepared(time.perf_counter() - started)
        return Prepared(held=self.broadcaster.held, state=state)

    def _advance(self, weights: Weights, version: int) -> tuple[Step, BroadcastState]:
        step = self.broadcaster.advance(weights, version)
        return step, self.broadcaster.state()

    async def announce(self, announced: Announced) -> int:
        caster = self.broadcaster
        about = caster.about(announced.round, announced.deadline, self.model.training, final=announced.final, cohort=announced.cohort)
        sent: Sent
        if self._republish:  # covers a pending version too: its keyframe, retained copy and announcement are in the state
            sent = await caster.republish(about)
            self._republish, self._pending = False, None
        elif self._pending is not None:
            sent = await caster.publish(self._pending, about)
            self._pending = None
        else:
            sent = await caster.announce(about)
        self.metrics.broadcast_sent(announcement=sent.announcement, keyframe=sent.keyframe, retained=sent.retained, task=sent.task)
        self.metrics.broadcast_catch_up(caster.catch_up_bytes(), caster.worst_case_catch_up_bytes())
        return sent.announcement

    def lost_retained(self) -> None:
        self._republish = True

    # ------------------------------------------------------------------ the fleet
    def _on_presence(self, client: str, presence: Presence | None) -> None:
        request = self.failures.on_presence(client, presence, len(self.fleet.online))
        self.metrics.broadcast_failing(len(self.failures.failing))
        if request and self.broadcaster.started:
            self.broadcaster.request_keyframe()
            self._republish = True  # the broker's copy may be what is lost or damaged: the task and all, at the next announcement
            self.metrics.broadcast_keyframe_requested()
            log.warning("delta broadcasts: %d devices report catch-up failures since keyframe v%d (%s): a keyframe at the next version, "
                        "everything retained put back", len(self.failures.failing), self.broadcaster.encoder.keyframe.version,
                        ", ".join(sorted(self.failures.failing)[:5]))
