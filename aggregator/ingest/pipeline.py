"""One update, from untrusted bytes to its receipt: validate, admit, spool, fold, answer.

The aggregator's own connection (``--workers 0``, ingest/source.py) and each ingest worker
(aggregator/workers/) run this same path, so the rules and the order of effects cannot drift apart:

1. ``parse_update``: size, strict decode, fleet, sender identity (aggregator/validation.py);
2. ``Admission.precheck`` (the round's rules: aggregator/rounds/): a cheap early refusal (duplicate, stale, round full) before any
   tensor is decoded;
3. ``decode_delta`` and the defences (norm bound, weight cap);
4. ``Admission.commit``: admit and spool in one store transaction, which is what makes dedupe
   and the round's target hold across worker processes (the precheck may have raced);
5. fold into this process's partial sum and queue the receipt.

Every store call runs on the store's thread (aggregator/store/thread.py): the admission's
precheck and commit are awaited, so the loop never waits on SQLite or the disk.

Group commit: the store's hot-path writes are deferred (atomic, not yet fsync'd), and receipts
wait in order until ``release``, which records them and makes the store durable with one
``Store.sync_soon`` (its fdatasyncs run on the store's sync thread while this loop decodes the
next updates) and, once that completes, hands them to the connection's background publisher. A release happens RELEASE_AFTER seconds
after the first receipt was queued (a loop timer), or at once when RELEASE_EVERY are waiting:
a commit delay, as in PostgreSQL's ``commit_delay``. "Release when the inbox is empty" does not
work here: the broker sends an aggregator one update at a time (Receive Maximum 1, see
fedge_contract.mqtt), so its inbox is empty after nearly every update, and that rule paid one
fsync per update (0.4-0.5 ms each here, as much as decoding a 100k-parameter update). A lone
update waits at most RELEASE_AFTER for its receipt; rounds last seconds to minutes.
No receipt, not even a rejection's, leaves before the writes in front of it are durable: a
"duplicate" must never announce an acceptance that a power cut could still undo. Anything
that fails there (an fdatasync error, a receipt row the full disk refused) ends receipting for
good: after a failed fsync the kernel may report later syncs as successful without the data, so
the process stops (``on_failure`` is told at once, and the next ``handle`` or ``drain`` raises)
and restarts from what its store holds.

Every update gets exactly one receipt; ``answered`` counts it (the aggregator's counters and
Prometheus metrics, or a worker's report to its coordinator).
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any, ParamSpec, TypeVar

import numpy as np

from aggregator.aggregation.defence import Checked, Collector, Defence, Mergeable
from aggregator.aggregation.fold import scaled
from aggregator.errors import LedgerMismatch, Rejection
from aggregator.ingest.validation import UpdateLimits, decode_delta, parse_update
from aggregator.rounds.policy import Admission
from aggregator.store import ReceiptRow, SpooledUpdate, Store, StoreAccess, call, run
from fedge_contract import Receipt, ReceiptStatus, Topics, Update
from fedge_contract.tensors import ModelSpec

Send = Callable[[str, bytes], None]  # a background publish (Connection.publish_soon)
Answered = Callable[[ReceiptStatus, str, int], None]

RELEASE_EVERY = 64  # receipts: release at once when this many wait
RELEASE_AFTER = 0.01  # seconds: otherwise this long after the first one was queued
OFF_LOOP_BYTES = 16 * 1024 * 1024  # a model this large (4M float32 parameters) is decoded and folded off the loop

P = ParamSpec("P")
R = TypeVar("R")


def _record_and_sync(store: Store, rows: list[ReceiptRow], durable: concurrent.futures.Future[None]) -> None:
    """On the store's thread: record a batch of receipts, then complete ``durable`` once the store's sync did."""
    try:
        store.record_receipts(rows)
        synced = store.sync_soon()
    except BaseException as exc:
        durable.set_exception(exc)
        return

    def settle(done: concurrent.futures.Future[None]) -> None:
        error = done.exception() if not done.cancelled() else concurrent.futures.CancelledError()
        if error is None:
            durable.set_result(None)
        else:
            durable.set_exception(error)

    synced.add_done_callback(settle)


class Ingest:
    """The per-update path and this process's partial sum of the open round."""

    def __init__(
        self, *, fleet: str, spec: ModelSpec, limits: UpdateLimits, defence: Defence, db: StoreAccess,
        send: Send, answered: Answered, log: logging.Logger, loop: asyncio.AbstractEventLoop | None = None,
        on_failure: Callable[[BaseException], None] | None = None,
    ) -> None:
        self.fleet = fleet
        self.topics = Topics(fleet)
        self.spec = spec
        self.limits = limits
        self.defence = defence
        self.db = db
        self.send = send
        self.answered = answered
        self.log = log
        self.loop = loop  # runs the release timer; None: the caller releases (tests, tools)
        self.on_failure = on_failure  # told once when receipting stops for good (the owner stops)
        self.collector: Collector = defence.collector(spec)
        self.folded: set[str] = set()  # update ids in ``collector``
        # receipts (row, topic, payload) waiting for the store's next sync; no row: a decision recorded before, sent again
        self._unsent: list[tuple[ReceiptRow | None, str, bytes]] = []
        self._syncing: collections.deque[tuple[asyncio.Future[None], list[tuple[str, bytes]]]] = collections.deque()  # released, in order
        self._failure: BaseException | None = None  # a sync that failed: nothing is receipted any more
        self._timer: asyncio.TimerHandle | None = None

    def reset(self) -> None:
        """An empty partial sum for a new round."""
        self.collector = self.defence.collector(self.spec)
        self.folded = set()

    async def handle(self, client: str, payload: bytes, admission: Admission) -> Update | None:
        """Answer one update; the Update if it was accepted (spooled, folded, its receipt queued)."""
        self._raise_if_failed()
        update: Update | None = None
        try:
            update = parse_update(payload, topic_client=client, fleet=self.fleet, limits=self.limits)
            await run(self.db, admission.precheck, update)
            checked = await self._whole_model(self._assess, update)
            factor = await run(self.db, admission.commit, update, payload)
        except Rejection as rejection:
            update_id = update.update_id if update else Update.peek_update_id(payload, self.limits.max_bytes)
            self.receipt(client, update_id, rejection.status, rejection.reason, admission, len(payload))
            return None
        self.defence.record(checked)
        await self._whole_model(self._fold, update.update_id, checked.delta, checked.weight, factor)
        self.receipt(client, update.update_id, ReceiptStatus.ACCEPTED, "", admission, len(payload))
        return update

    def _assess(self, update: Update) -> Checked:
        return self.defence.assess(decode_delta(update, self.spec), update.num_samples)

    async def _whole_model(self, step: Callable[P, R], *args: P.args, **kwargs: P.kwargs) -> R:
        """A step that touches every parameter (decoding, folding): on a worker thread for large models.

        A 25M-parameter update took ~1.5 s to decode and fold here, all of it on the event loop;
        numpy releases the GIL, so on a thread the loop serves the connection meanwhile. Below
        OFF_LOOP_BYTES the thread hop (~30 us) costs more than it saves. One update at a time
        either way: nothing else touches the partial sum meanwhile.
        """
        if self.spec.nbytes < OFF_LOOP_BYTES:
            return step(*args, **kwargs)
        return await asyncio.to_thread(step, *args, **kwargs)

    def receipt(self, client: str, update_id: str | None, status: ReceiptStatus, reason: str, admission: Admission, nbytes: int) -> None:
        """Record and queue one receipt (``release`` sends it)."""
        self.answered(status, reason, nbytes)
        number = admission.number
        level = logging.INFO if status is ReceiptStatus.ACCEPTED else logging.WARNING
        self.log.log(level, "receipt round=%d client=%s update=%s status=%s reason=%s", number, client, update_id, status.value, reason,
                     extra={"round": number, "client": client, "update": update_id, "status": status.value, "reason": reason})
        row = ReceiptRow(time.time(), number, client, update_id, status.value, reason, nbytes)
        receipt = Receipt(self.fleet, client, update_id, status, reason, number, admission.base_version)
        self._unsent.append((row, self.topics.receipt(client), receipt.to_bytes()))
        if self._timer is None and self.loop is not None:
            self._timer = self.loop.call_later(RELEASE_AFTER, self.release)

    def confirm(self, client: str, update_id: str, admission: Admission) -> None:
        """Queue ``accepted`` again for an update the store holds from before a restart (not recorded twice).

        A SIGKILLed aggregator may have spooled an update and died before its receipt left; the resend
        of a device that is still online gets ``duplicate``, but one whose round closed before it
        resent counted the update as dropped although it was folded (issue 19's chaos soak). Sending
        the receipt again is idempotent: a device that has it ignores an answer for an update it forgot.
        """
        receipt = Receipt(self.fleet, client, update_id, ReceiptStatus.ACCEPTED, "", admission.number, admission.base_version)
        self._unsent.append((None, self.topics.receipt(client), receipt.to_bytes()))
        if self._timer is None and self.loop is not None:
            self._timer = self.loop.call_later(RELEASE_AFTER, self.release)

    @property
    def unsent(self) -> int:
        """Receipts waiting for ``release``."""
        return len(self._unsent)

    def due(self) -> bool:
        """Whether to ``release`` now rather than when the timer fires: a full batch is waiting."""
        return len(self._unsent) >= RELEASE_EVERY

    def release(self) -> int:
        """Record the queued receipts, make the store durable, then send them in order; how many.

        With a loop, the store syncs on its thread and the receipts go out from the loop when it
        is done (``drain`` waits for that); without one (tests, tools), before this returns.
        Synchronous, so the timer can call it between two steps of the task that owns this
        Ingest; its store work queues behind theirs on the store's thread (one transaction at a time).
        """
        self._disarm()
        self._raise_if_failed()
        if not self._unsent:
            return 0
        unsent, self._unsent = self._unsent, []
        rows = [row for row, _, _ in unsent if row is not None]
        messages = [(topic, payload) for _, topic, payload in unsent]
        if self.loop is None:
            self.db.submit(self.db.store.record_receipts, rows).result()
            self.db.submit(self.db.store.sync).result()
            for topic, payload in messages:
                self.send(topic, payload)
            return len(messages)
        # From the timer, an exception would only be logged: whatever fails, now or on the store's
        # thread, reaches _send_durable through ``durable`` and stops the ingest instead.
        synced: concurrent.futures.Future[None] = concurrent.futures.Future()
        try:
            self.db.submit(_record_and_sync, self.db.store, rows, synced)
        except BaseException as exc:
            synced.set_exception(exc)
        if synced.done() and synced.exception() is not None:  # it could not even start (InlineStore: at once)
            self._fail(synced.exception())  # type: ignore[arg-type]
            return 0
        durable = asyncio.wrap_future(synced, loop=self.loop)
        self._syncing.append((durable, messages))
        durable.add_done_callback(self._send_durable)
        return len(messages)

    def _send_durable(self, _: object = None) -> None:
        """Send the receipts of every released batch whose sync completed, oldest first (they complete in order)."""
        while self._syncing and self._syncing[0][0].done():
            durable, messages = self._syncing.popleft()
            failure = durable.exception() if not durable.cancelled() else asyncio.CancelledError("store sync cancelled")
            if failure is not None:
                self._fail(failure)
                return
            for topic, payload in messages:
                self.send(topic, payload)

    def _fail(self, failure: BaseException) -> None:
        self._failure = failure
        self._syncing.clear()
        self.log.critical("the store could not record or make durable a batch of receipts (%r): no receipt will be sent; stopping",
                          failure)
        if self.on_failure is not None:
            self.on_failure(failure)

    async def drain(self) -> None:
        """``release``, then wait until every receipt released so far has been handed to ``send``."""
        self.release()
        while self._syncing:
            await asyncio.wait([durable for durable, _ in self._syncing])
            self._send_durable()
        self._raise_if_failed()

    def _raise_if_failed(self) -> None:
        if self._failure is not None:
            raise self._failure

    def close(self) -> None:
        """Its owner stops (``drain`` first to send what waits): disarm the timer, abandon receipts still syncing.

        An abandoned receipt is not lost work: its update is spooled, and its sender's resend gets
        ``duplicate``.
        """
        self._disarm()
        for durable, _ in self._syncing:
            durable.remove_done_callback(self._send_durable)
        self._syncing.clear()

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def refold(self, spooled: Iterable[SpooledUpdate], factor: Callable[[Update], float] = lambda update: 1.0) -> list[Update]:
        """Fold spooled updates (accepted before a restart, or by a worker that died) not folded here yet.

        They were validated when accepted: a norm bound now clips instead of rejecting them.
        """
        refolded = []
        for row in spooled:
            if row.update_id in self.folded:
                continue
            update = parse_update(row.payload, topic_client=row.client_id, fleet=self.fleet, limits=self.limits)
            checked = self.defence.assess(decode_delta(update, self.spec), update.num_samples, strict=False)
            self.defence.record(checked)
            self._fold(update.update_id, checked.delta, checked.weight, factor(update))
            refolded.append(update)
        return refolded

    def _fold(self, update_id: str, delta: dict[str, np.ndarray], weight: float, factor: float) -> None:
        self.collector.add(delta if factor == 1.0 else scaled(delta, factor), weight)
        self.folded.add(update_id)

    # ------------------------------------------------------------------ partial sums (ingest workers)
    def partial(self) -> dict[str, Any]:
        """This process's share of the round, as plain values for the coordinator's ``merge``."""
        norms, clipped = self.defence.take_norms()
        return {"sum": self._mergeable().to_wire(), "update_ids": sorted(self.folded), "norms": norms, "clipped": clipped}

    def merge(self, partial: Mapping[str, Any]) -> None:
        """Add a worker's ``partial`` into this partial sum; an update folded twice is a LedgerMismatch."""
        ids = set(partial["update_ids"])
        if len(ids) != len(partial["update_ids"]) or ids & self.folded:
            raise LedgerMismatch(f"updates folded twice: {sorted(ids & self.folded)[:5]}")
        self._mergeable().merge_wire(partial["sum"])
        self.folded |= ids
        self.defence.absorb(list(partial["norms"]), int(partial["clipped"]))

    def _mergeable(self) -> Mergeable:
        if not hasattr(self.collector, "merge_wire"):  # AggregatorConfig refuses --workers with such a rule
            raise TypeError(f"{type(self.collector).__name__} cannot be split across ingest workers")
        return self.collector  # type: ignore[return-value]

    async def check_ledger(self, round_no: int) -> None:
        """The updates folded are exactly those the store accepted into ``round_no``: fail loudly otherwise."""
        accepted = set(await call(self.db, Store.accepted_ids, round_no))
        if accepted != self.folded:
            missing, extra = sorted(accepted - self.folded), sorted(self.folded - accepted)
            raise LedgerMismatch(
                f"round {round_no}: the merged sums miss {len(missing)} accepted updates {missing[:5]} and hold "
                f"{len(extra)} the store did not accept {extra[:5]}; restart the aggregator to re-fold the round from its store"
            )
