"""What the aggregator tells the fleet: each round's model announcement and its RoundStatus.

The model goes out through a channel (aggregator/broadcasting/): each version as a delta from the
model devices hold (delta broadcasts, the default), or the whole model in ``global_codec``. The
Announcer gives it the round's side of the announcement (``Announced``: round, deadline, final,
and in ``cohort`` whom the round invites, ``Round.invitation()``, and the eval threshold of its
version, ``ask_eval``; without either the field is absent) and counts what each device downloaded
for it: in the round's row of the store (``rounds.bytes_down``), in RoundStatus and in Prometheus.
RoundStatus is published when a round changes state and, while updates are accepted, at most once
per burst and every ``STATUS_INTERVAL`` under sustained load: one status per update would cost a
publish per update.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping

from aggregator.broadcasting import Announced, ModelChannel
from aggregator.config import AggregatorConfig
from aggregator.model import GlobalModel as ModelState
from aggregator.observability.metrics import AggregatorMetrics
from aggregator.rounds.policy import Round
from aggregator.store import Store, StoreAccess, call
from fedge_contract import RoundState, RoundStatus, Topics
from fedge_contract.cohort import Participation
from fedge_contract.mqtt import Connection

log = logging.getLogger("fedge.aggregator")

AskEval = Callable[[int, bool], int | None]  # (version, final) -> the eval threshold its announcement carries, or None

STATUS_INTERVAL = 0.5  # seconds: RoundStatus at most this stale while updates keep coming


class Announcer:
    def __init__(self, config: AggregatorConfig, model: ModelState, conn: Connection, metrics: AggregatorMetrics,
                 clock: Callable[[], float], ask_eval: AskEval = lambda version, final: None, *, channel: ModelChannel,
                 db: StoreAccess | None = None) -> None:
        self.config = config
        self.topics = Topics(config.fleet)
        self.model = model
        self.conn = conn
        self.metrics = metrics
        self.clock = clock
        self.ask_eval = ask_eval  # the eval threshold an announcement of a version carries (observability/evaluations.py)
        self.channel = channel  # delta broadcasts or whole models (aggregator/broadcasting/), bound to ``conn``
        self.db = db  # where each round's bytes down are counted (None: not counted)
        self.status: RoundStatus | None = None  # the last status published (the dashboard's)
        self.last_metrics: Mapping[str, float] = {}  # the newest model's, in every status
        self.bytes_out = 0  # what each device downloaded for every announcement so far
        self._round: int | None = None  # the round the traffic figures are about
        self._bytes_up = 0  # update bytes received while that round is open
        self._bytes_down = 0  # bytes each device downloads for that round's latest announcement
        self._dirty = False  # accepted updates not yet in a published RoundStatus
        self._status_at = 0.0  # time.monotonic() of the last RoundStatus published for accepted updates

    async def announce(self, rnd: Round) -> None:
        """The round's model (retained), then its status: open."""
        self.metrics.round_opened(rnd.number, self.model.version, rnd.accepted, rnd.target)
        if rnd.number != self._round:
            self._round, self._bytes_up = rnd.number, 0
        nbytes = await self.channel.announce(Announced(rnd.number, rnd.deadline, cohort=self._participation(rnd, self.model.version)))
        await self._count_down(rnd.number, nbytes)
        await self.publish_status(rnd, RoundState.OPEN)
        deadline = f"deadline in {rnd.deadline - self.clock():.0f}s" if rnd.deadline is not None else "no deadline"
        log.info("round %d open on v%d: target %d, min %d, %s (%d bytes to each device)",
                 rnd.number, self.model.version, rnd.target, rnd.min_updates, deadline, nbytes)

    async def final(self) -> None:
        """The final model (``final: true``, retained) and the finished status."""
        version = self.model.version
        nbytes = await self.channel.announce(Announced(version, None, final=True, cohort=self._participation(None, version)))
        self.bytes_out += nbytes
        await self.publish_status(None, RoundState.FINISHED)
        log.info("finished: model v%d after %d rounds", version, version)

    async def _count_down(self, round_no: int, nbytes: int) -> None:
        self._bytes_down = nbytes
        self.bytes_out += nbytes
        if self.db is not None:  # every announcement is downloaded again by each subscribed device
            await call(self.db, Store.add_bytes_down, round_no, nbytes)

    def received(self, nbytes: int) -> None:
        """An update of ``nbytes`` was answered (whatever its receipt): bytes up of the open round."""
        self._bytes_up += nbytes

    def _participation(self, rnd: Round | None, version: int) -> Participation | None:
        """The announcement's ``cohort`` field: whom the round invites, whom the version asks to evaluate (None: neither)."""
        invited = rnd.invitation() if rnd is not None else None
        threshold = self.ask_eval(version, rnd is None)
        self.metrics.cohort(invited.count if invited is not None else 0)
        return None if invited is None and threshold is None else Participation(invited, threshold)

    def accepted(self) -> None:
        """An update was accepted: the status is due (``status_if_due``)."""
        self._dirty = True

    def status_if_due(self, rnd: Round | None, idle: bool) -> None:
        """RoundStatus once per burst of accepted updates (``idle``: the burst ended), and at least
        every STATUS_INTERVAL under sustained load. A round whose own protocol moved on (its count or
        note changed: a secure round's phase, an abandoned session) is due too."""
        if rnd is None or not (self._dirty or self._moved(rnd)):
            return
        if idle or time.monotonic() - self._status_at >= STATUS_INTERVAL:
            self._dirty, self._status_at = False, time.monotonic()
            self.conn.publish_soon(self.topics.status, self._status(rnd, RoundState.OPEN).to_bytes(), retain=True)

    def _moved(self, rnd: Round) -> bool:
        last = self.status
        return last is None or (rnd.number, rnd.accepted, rnd.target, rnd.note) != (last.round, last.accepted, last.target, last.note)

    async def publish_status(self, rnd: Round | None, state: RoundState) -> None:
        self._dirty = False
        await self.conn.publish(self.topics.status, self._status(rnd, state).to_bytes(), retain=True)

    def _status(self, rnd: Round | None, state: RoundState) -> RoundStatus:
        rounds = self.config.rounds
        status = RoundStatus(
            fleet=self.config.fleet,
            round=rnd.number if rnd else self.model.version,
            model_version=self.model.version,
            state=state,
            accepted=rnd.accepted if rnd else 0,
            target=rnd.target if rnd else rounds.target,
            min_updates=rnd.min_updates if rnd else rounds.min_updates,
            deadline=rnd.deadline if rnd else None,
            rounds_total=rounds.rounds or None,
            last_metrics=self.last_metrics,
            note=rnd.note if rnd else "",
            bytes_up=self._bytes_up if rnd else None,
            bytes_down=self._bytes_down if rnd else None,
        )
        self.metrics.accepted(status.accepted)
        self.status = status
        return status
