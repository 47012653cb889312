"""The aggregator: one coordinator that runs a fleet's rounds, built from small parts.

    Coordinator                    the round loop below, and nothing else
     +-- GlobalModel   (model.py)          weights, version, strategy, checkpoints, evaluation
     +-- RoundPolicy   (rounds/)           what a round is: sync rounds, the FedBuff buffer, secure rounds
     +-- IngestSource  (ingest/, workers/) where updates are validated and folded: this
     |                                     connection, or N worker processes
     +-- StoreThread   (store/)            the SQLite ledger and spool, on a thread of its own
     +-- Announcer     (announce.py)       each round's model and RoundStatus to the fleet, the model
     |    +-- ModelChannel (broadcasting/)  as delta broadcasts (the default) or whole models
     +-- FleetView, Evaluations, metrics, dashboard (observability/): presence, federated evaluation

The loop, for every mode and every source::

    policy.check_in(version)            # a cohort waits for devices to check in (events handled meanwhile)
    rnd = policy.open(version)          # a restart resumes the round the store holds
    source.open(rnd)                    # re-fold what the store spooled for it
    announce(rnd); collect(rnd)         # events until the round is complete or its deadline closes it
    close(rnd)                          # receipts out, sum gathered, strategy, broadcast prepared,
                                        # checkpoint (with the broadcast state), then the next

One task owns all round state, so no locks are needed. The order of effects follows DESIGN.md:
an accepted update is spooled before its receipt; a new model's checkpoint is committed before
it is published. Nothing here blocks the event loop: the store's calls run on its thread, and
whole-model work (the strategy, encoding, evaluation, re-folding) on worker threads.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import aiomqtt

from aggregator.aggregation.defence import Defence
from aggregator.announce import Announcer
from aggregator.broadcasting import ModelChannel, model_channel
from aggregator.config import AggregatorConfig
from aggregator.errors import LedgerMismatch
from aggregator.ingest.pipeline import Answered, Ingest
from aggregator.ingest.source import IngestSource, LocalIngest
from aggregator.ingest.validation import limits_for
from aggregator.model import GlobalModel, load_task
from aggregator.observability.dashboard import DashboardServer, fleet_state
from aggregator.observability.evaluations import Evaluations
from aggregator.observability.fleet import FleetView
from aggregator.observability.metrics import AggregatorMetrics, MetricsServer
from aggregator.rounds import DeadlineAction, Round, RoundPolicy, RoundServices, make_policy
from aggregator.rounds.invitations import TOP_UP_EVERY
from aggregator.rounds.sync import SyncRound
from aggregator.store import Store, StoreAccess, StoreThread, call
from fedge_contract import Receipt, ReceiptStatus, RoundState, Topics
from fedge_contract.mqtt import Connection
from fedge_contract.supervisor import Supervisor
from fedge_contract.tensors import ModelSpec
from fedge_runtime.loop_stall import LoopStallMonitor

if TYPE_CHECKING:
    from fedge_tasks import Task

log = logging.getLogger("fedge.aggregator")


def ingest_source(config: AggregatorConfig, ingest: Ingest, db: StoreAccess, spec: ModelSpec, *, answered: Answered) -> IngestSource:
    """This process's own ingest (``ingest.workers`` 0), or worker processes' (``ingest`` then holds the merged sum)."""
    if config.ingest.workers:
        from aggregator.workers.source import WorkerIngest

        return WorkerIngest(config, ingest, db, spec, answered=answered)
    return LocalIngest(ingest, db, Topics(config.fleet), inbox_limit=config.ingest.inbox_limit, chunk_timeout=config.ingest.chunk_timeout)


class Coordinator:
    """Runs ``config.rounds.rounds`` rounds of one fleet (resuming from the store), then publishes the final model."""

    def __init__(self, config: AggregatorConfig, *, task: Task | None = None, policy: RoundPolicy | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.config = config
        self.topics = Topics(config.fleet)
        self.clock = clock
        self.counters: collections.Counter[str] = collections.Counter()  # receipts by status (and reason), bytes in
        self.metrics = AggregatorMetrics()  # Prometheus; served only with monitoring.metrics_port
        self.fleet = FleetView(config.fleet, self.metrics)
        self.policy = policy or make_policy(config, self.fleet)  # a cohort is selected from the fleet view
        rounds = config.rounds
        self.evaluations = Evaluations(config.fleet, rounds.eval_every, rounds.eval_fraction, self.metrics,
                                       max_samples=config.defence.max_weight) if rounds.eval_every else None
        self.defence = Defence(config)  # norm bound, weight cap, robust rule, DP
        self.metrics_server: MetricsServer | None = None
        self.dashboard_server: DashboardServer | None = None
        self.stall = LoopStallMonitor()  # the event loop's longest stall (Prometheus, bench/loop_stall)
        self.epoch: int | None = None  # this aggregator's hold on the store (Store.take_over)
        self._task = task
        self._collecting: Round | None = None  # the round whose model is out, until it closes
        self._top_up_at: float | None = None  # when a presence change the last top-up missed is looked at again
        self._announcer: Announcer | None = None
        self.channel: ModelChannel | None = None  # how each version reaches devices (made with the model)

    # ------------------------------------------------------------------ lifetime
    async def run(self) -> None:
        # importing torch and building the model take seconds: off the loop, like every whole-model step
        model = await asyncio.to_thread(lambda: GlobalModel(self.config, load_task(self.config, self._task), self.policy.task_extra()))
        self.model = model
        self.channel = channel = model_channel(self.config, model, self.metrics, self.fleet)
        self.limits = limits_for(self.config, model.spec)  # what an update may be: size, samples, senders
        async with contextlib.AsyncExitStack() as stack:
            failures = await stack.enter_async_context(Supervisor("aggregator"))  # a part that fails stops the aggregator
            await stack.enter_async_context(self.stall)
            self.db = await stack.enter_async_context(StoreThread(self.config.store, fsync=self.config.ingest.durability == "disk"))
            self.epoch = await model.resume(self.db, channel.initial)
            await channel.resume(self.db)  # the broadcast state committed with the checkpoint resumed
            self.metrics.model_version.set(model.version)
            self.metrics.watch_stall(lambda: self.stall.longest)
            await self._serve_http(stack)
            source = self._make_source(failures)
            conn = await stack.enter_async_context(Connection(
                self.config.broker,
                self.config.mqtt_client_id,
                subscriptions=[self.topics.all_presence, *([self.topics.all_evals] if self.evaluations else []), *source.subscriptions,
                               *self.policy.subscriptions(self.topics)],
                persistent=True,
                session_expiry=self.config.session_expiry,
                on_connect=self._on_reconnect,
                max_buffered=source.inbox_limit,
            ))
            self.conn = conn
            self.policy.bind(RoundServices(conn, model.spec, self.fleet, self._answer))
            self.metrics.watch_published(lambda: conn.bytes_published)
            ask_eval = self.evaluations.ask if self.evaluations else (lambda version, final: None)
            channel.bind(conn)
            self._announcer = Announcer(self.config, model, conn, self.metrics, self.clock, ask_eval, channel=channel, db=self.db)
            source.bind(conn, self.epoch)
            self.source = await stack.enter_async_context(source)
            await self._serve()

    def _make_source(self, failures: Supervisor) -> IngestSource:
        self.ingest = ingest = Ingest(
            fleet=self.config.fleet, spec=self.model.spec, limits=self.limits, defence=self.defence,
            db=self.db, send=self._publish_soon, answered=self._count_receipt, log=log, loop=asyncio.get_running_loop(),
            on_failure=failures.fail,
        )
        return ingest_source(self.config, ingest, self.db, self.model.spec, answered=self._count_receipt)

    async def _serve_http(self, stack: contextlib.AsyncExitStack) -> None:
        monitoring = self.config.monitoring
        if monitoring.metrics_port is not None:
            server = MetricsServer(self.metrics.exposition, monitoring.metrics_host, monitoring.metrics_port)
            self.metrics_server = await stack.enter_async_context(server)
        if monitoring.dashboard_port is not None:
            dashboard = DashboardServer(self._dashboard_state, monitoring.metrics_host, monitoring.dashboard_port)
            self.dashboard_server = await stack.enter_async_context(dashboard)

    @property
    def announcer(self) -> Announcer:
        if self._announcer is None:
            raise RuntimeError("the aggregator is not connected yet")
        return self._announcer

    def _publish_soon(self, topic: str, payload: bytes) -> None:
        self.conn.publish_soon(topic, payload)

    # ------------------------------------------------------------------ rounds
    async def _serve(self) -> None:
        while not self.model.done:
            while (until := await self.policy.check_in(self.model.version, self.clock(), self.db)) is not None:
                await self._between_rounds(until)  # a cohort waits for devices to check in (their presence)
            rnd = await self.policy.open(self.model.version, self.clock(), self.db)
            if await self._open(rnd):  # a restart: devices cut off meanwhile need time to come back and resend
                await self._announce_with_grace(rnd)
            else:
                await self.announcer.announce(rnd)
            try:
                await self._collect(rnd)
                await self._close(rnd)
            finally:
                await rnd.close()
        await self.announcer.final()
        await self._final_evaluations()
        await self._answer_leftovers()
        await self.source.drain()  # receipts decided since the last round closed
        await self.conn.flush()  # everything queued is out before the aggregator exits

    async def _answer_leftovers(self) -> None:
        """Answer the updates that already arrived after the last round closed (issue 19: they stayed in the
        agents' outboxes): each gets ``stale``, or ``duplicate`` if it was accepted, as in any closed round."""
        while not self.source.idle():
            await self._between_rounds(None)

    async def _between_rounds(self, until: float | None) -> None:
        """Handle the next event (until ``until``, if one comes) while no round is open: presence and evaluations
        as always, and an update as one for a closed round (``stale``, or ``duplicate`` if it was accepted)."""
        try:
            async with asyncio.timeout(None if until is None else max(0.0, until - self.clock())):
                event = await self.source.next_event()
        except TimeoutError:
            return
        if not await self._take(event):
            over = SyncRound.admitting(self.model.version + 1, self.model.version, target=1)  # a round the store never opened
            await self.source.handle(event, over)

    async def _final_evaluations(self) -> None:
        """Wait, at most a round's deadline, for the reports of the online devices the final announcement asked
        (a device that goes offline first, such as an agent with no held-out data exiting on the final model, is not awaited)."""
        evaluations = self.evaluations
        if evaluations is None:
            return
        version, ends = self.model.version, self.clock() + self.config.rounds.deadline
        awaited = evaluations.awaited(version, self.fleet.devices)
        while (awaited - evaluations.reported(version)) & self.fleet.online and self.clock() < ends:
            await self._between_rounds(ends)
        await evaluations.flush(self.db)

    async def _open(self, rnd: Round) -> bool:
        """Record the round open and re-fold what the store spooled for it; whether it is resumed (open before a restart)."""
        resumed = await call(self.db, Store.open_round, rnd.number, rnd.base_version, rnd.deadline)
        admission = rnd.admission(self.db.store, epoch=self.epoch)
        for accepted in await self.source.open(rnd):  # a restart mid-round: re-fold what was accepted
            rnd.record(accepted)
            self.ingest.confirm(accepted.client_id, accepted.update_id, admission)  # its receipt may never have left
        if rnd.accepted:
            log.info("round %d: re-folded %d spooled updates and confirmed them to their devices", rnd.number, rnd.accepted)
        return resumed

    async def _collect(self, rnd: Round) -> None:
        self._collecting = rnd
        self._top_up_at = None
        try:
            while not rnd.complete:
                deadline = rnd.deadline
                if deadline is not None and deadline <= self.clock():
                    action = await rnd.on_deadline(self.clock())
                    if action is DeadlineAction.CLOSE:
                        log.info("round %d: deadline with %d/%d updates, closing", rnd.number, rnd.accepted, rnd.target)
                        return
                    if action is DeadlineAction.EXTEND:
                        log.warning("round %d: deadline with %d < min %d updates, extended", rnd.number, rnd.accepted, rnd.min_updates)
                        await rnd.extend(self.db)  # a cohort invites more devices (stored before it is announced)
                        await call(self.db, Store.extend_round, rnd.number, rnd.deadline)
                        await self.announcer.announce(rnd)
                    else:  # CONTINUE: a phase of the round's own protocol moved on
                        self.announcer.status_if_due(rnd, self.source.idle())
                    continue
                wake = min((t for t in (deadline, self._top_up_at) if t is not None), default=None)
                try:
                    async with asyncio.timeout(None if wake is None else wake - self.clock()):
                        event = await self.source.next_event()
                except TimeoutError:
                    if self._top_up_at is not None and self._top_up_at <= self.clock():
                        self._top_up_at = None
                        await self._invite_newcomers(rnd, again=False)
                    continue
                await self._handle(event, rnd)
        finally:
            self._collecting = None

    async def _handle(self, event: Any, rnd: Round) -> None:
        if await self._take(event):
            await self._invite_newcomers(rnd, again=True)
        elif isinstance(event, aiomqtt.Message) and rnd.owns(str(event.topic)):
            await self._round_message(event, rnd)
        else:
            outcome = await self.source.handle(event, rnd)
            for accepted in outcome.accepted:
                rnd.record(accepted)
                self.announcer.accepted()
            if outcome.reannounce:  # updates a dead worker had taken off the broker: agents resend on a re-announcement
                await self.announcer.announce(rnd)
        self.announcer.status_if_due(rnd, self.source.idle())

    async def _invite_newcomers(self, rnd: Round, *, again: bool) -> None:
        """Presence changed: a round short of its cohort invites who checked in, and is re-announced. Top-ups are at
        most every TOP_UP_EVERY seconds, so with ``again`` one that invited nobody is tried once more when that
        interval ends: a device that checks in just after another is invited then, not at the deadline's extension."""
        if await rnd.invite_newcomers(self.db, self.clock()):
            self._top_up_at = None
            await self.announcer.announce(rnd)
        elif again:
            self._top_up_at = self.clock() + TOP_UP_EVERY

    async def _round_message(self, message: aiomqtt.Message, rnd: Round) -> None:
        """A message of the round's own protocol (secure aggregation's phases); each refusal is answered with a receipt."""
        payload = message.payload if isinstance(message.payload, bytes) else b""
        for receipt in await rnd.on_message(str(message.topic), payload, self.clock()):
            self._answer(receipt, len(payload))

    def _answer(self, receipt: Receipt, nbytes: int) -> None:
        """A receipt the round decided itself (a refused message of its protocol): counted, then published."""
        self._count_receipt(receipt.status, receipt.reason, nbytes)
        self.conn.publish_soon(self.topics.receipt(receipt.client_id), receipt.to_bytes())

    async def _take(self, event: Any) -> bool:
        """Take ``event`` if it is the coordinator's own, whatever the source: a device's presence (the fleet
        view's) or evaluation report (observability/evaluations.py)."""
        if not isinstance(event, aiomqtt.Message):
            return False
        topic = str(event.topic)
        client = self.topics.client_of(topic)
        payload = event.payload if isinstance(event.payload, bytes) else b""
        if client is not None and topic == self.topics.presence(client):
            self.fleet.on_presence(client, payload)
            return True
        if client is None or self.evaluations is None or topic != self.topics.evals(client):
            return False
        self.evaluations.offer(client, payload)
        if self._announcer is not None:
            self._announcer.last_metrics = {**self._announcer.last_metrics, **self.evaluations.latest}
        if self.evaluations.due():
            await self.evaluations.flush(self.db)
        return True

    async def _on_message(self, message: aiomqtt.Message) -> None:
        """A message that arrived while the source gathered a round's sum (presence, evaluations; anything else is ignored)."""
        if not await self._take(message):
            log.debug("ignored %s while closing a round", message.topic)

    async def _close(self, rnd: Round) -> None:
        await self.source.drain()
        await self.conn.flush()  # receipts and throttled statuses go out before the round's state changes
        await self.announcer.publish_status(rnd, RoundState.AGGREGATING)
        started = self.clock()
        total = rnd.own_sum()
        if total is None:  # updates were folded by the ingest (this process or its workers): check them against the ledger
            total = await self.source.gather(rnd, self._on_message)
            if rnd.accepted != self.source.counted():
                raise LedgerMismatch(f"round {rnd.number}: {rnd.accepted} updates reported accepted, {self.source.counted()} folded")
        weights = await self.model.step(await asyncio.to_thread(total.mean))
        version = self.model.version + 1
        assert self.channel is not None
        prepared = await self.channel.prepare(weights, version)  # its broadcast (off the loop), committed with it
        metrics: dict[str, float] = {"round": float(rnd.number), "accepted": float(rnd.accepted), "samples": total.total_weight}
        metrics.update(rnd.metrics())
        metrics.update(self.defence.metrics(version, self.policy.sampling()))
        metrics.update(await self.model.evaluate(weights, prepared.held))
        metrics["aggregate_seconds"] = self.clock() - started
        await self.model.commit(self.db, rnd.number, weights, rnd.accepted, metrics, prepared.state)
        if self.evaluations is not None:
            await self.evaluations.flush(self.db)  # the previous versions' federated figures, into their rounds
        self.announcer.last_metrics = {**metrics, **(self.evaluations.latest if self.evaluations else {})}
        self.metrics.round_closed(version, metrics)
        log.info("round %d closed: v%d from %d updates %s", rnd.number, version, rnd.accepted,
                 " ".join(f"{k}={v:.4g}" for k, v in metrics.items() if k in ("accuracy", "loss")),
                 extra={"round": rnd.number, "version": version, "accepted": rnd.accepted})

    # ------------------------------------------------------------------ callbacks
    def _count_receipt(self, status: ReceiptStatus, reason: str, nbytes: int) -> None:
        """Every update answered, here or by an ingest worker: the counters and Prometheus metrics."""
        self.counters["bytes_in"] += nbytes
        self.counters[status.value] += 1
        if self._announcer is not None:
            self._announcer.received(nbytes)
        self.metrics.receipt(status.value, reason, nbytes)
        if status is not ReceiptStatus.ACCEPTED:
            self.counters[f"{status.value}:{reason.split(':', 1)[0]}"] += 1

    async def _on_reconnect(self) -> None:
        """Re-announce the open round after a reconnect (not on the first connect), with a grace period.

        A broker that crashed before its autosave lost our session, so updates published before
        we re-subscribed were dropped, and it may have lost the retained model too. The
        re-announcement restores the retained state, and agents treat it as "resend what has no
        receipt yet" (the aggregator dedupes by update id); the grace keeps the round open while
        their reconnect backoff brings them back.
        """
        rnd = self._collecting
        if self.conn.connections > 1 and self.channel is not None:
            self.channel.lost_retained()  # the next announcement puts every retained broadcast back
        if self.conn.connections > 1 and rnd is not None:
            log.info("reconnected: re-announcing round %d", rnd.number)
            await self._announce_with_grace(rnd)
            await rnd.on_reconnect()

    async def _announce_with_grace(self, rnd: Round) -> None:
        """Announce ``rnd`` and keep it open ``resend_grace`` s after the announcement is out (the deadline it
        carries includes the grace too), so devices coming back on their reconnect schedule can resend."""
        grace = self.config.rounds.resend_grace
        rnd.extend_to(self.clock() + grace)
        await self.announcer.announce(rnd)
        rnd.extend_to(self.clock() + grace)

    async def _dashboard_state(self) -> dict[str, Any]:
        rounds = await call(self.db, Store.rounds)
        bytes_up = await call(self.db, Store.bytes_by_round)
        received = await call(self.db, Store.receipts_by_round)
        status = self._announcer.status if self._announcer is not None else None
        return fleet_state(self.config.fleet, status, self.fleet.devices, rounds, bytes_up, self.clock(), received)
