"""Secure rounds (issue 17): synchronous rounds whose sum a SecAgg+ session computes, never seeing a delta.

A secure round trains on ``base_version`` like a sync round, but the devices hand their deltas to
the protocol (fedge_contract/secagg/DESIGN.md) instead of publishing Updates, and the round runs
one session of it through a ``SecAggRelay`` (aggregator/secagg_relay.py) on the coordinator's
connection. What the round does around the relay:

- **Cohort.** The session's cohort is named in its Setup, so the round first waits for devices:
  it opens a session as soon as its ``CohortSource`` offers ``target`` devices (at most target x
  1.3: rounds/secure_cohort.py), or at its deadline with whatever is there if that is at least
  ``max(3, min_updates, [secagg] min_survivors)``; with fewer it is extended (re-announced), as a
  sync round short of its minimum is.
- **Messages and time.** Every topic under ``secagg/up/`` is the round's (``owns``): each goes to
  the relay, and its refusals come back as rejection receipts. The round's ``deadline`` is the
  relay's next wake (a phase's deadline), or when it next looks for a cohort; ``on_deadline``
  hands the time to the relay and answers CONTINUE. A plain Update is refused by the round's
  admission (``rejected: secure_round``): it would put a delta in the clear.
- **Outcome.** The round is complete once the relay has a ``SecureMean``; ``own_sum`` gives it to
  the coordinator (with central DP noise added to the mean when ``--dp-noise`` is set: the devices
  weigh themselves equally and clip to ``--clip-norm``). An ``Abandoned`` session puts its reason in
  the round's ``note`` (RoundStatus) and the log, and a new session starts at once, with a fresh
  cohort, new keys and the same trained deltas; after ``[secagg] retries`` of them the round is
  extended (re-announced) and tries again. A session that produced a sum is never followed by
  another of the same round: two sums over different survivors would reveal the difference.
- **Persistence** (aggregator/store/secure.py). Each masked input is spooled by (round, session,
  client) before the relay folds it; the relay's checkpoints (no vector) are kept with the round;
  both are released in the transaction that commits the round's model. An aggregator restarted
  mid-round resumes the stored session (``SecAggRelay.resume``: each spooled input counted once,
  checked against the checkpoint's digests) or, if it cannot, records it abandoned and opens a new
  one. A session that had its sum resumes to the same sum; if even that fails (a damaged store),
  ``SecureResultLost`` stops the aggregator rather than open a second session.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import msgpack
import numpy as np

from aggregator.errors import Rejection, SecureResultLost
from aggregator.rounds.policy import Accepted, Admission, DeadlineAction, Round, RoundServices
from aggregator.rounds.secure_cohort import CohortSource, cohort_cap, online_eligible
from aggregator.rounds.sync import RoundPlan
from aggregator.secagg_relay import Refusal, SecAggRelay, SecAggSettings, SecureMean
from aggregator.store import SecureSession, Store, StoreAccess, call
from fedge_contract import Receipt, ReceiptStatus, Topics, Update
from fedge_contract.cohort import InviteSet
from fedge_contract.errors import Reason
from fedge_contract.secagg import Abandoned, ParameterError, PhaseTimeouts, ResumeError, Setup
from fedge_contract.secagg.params import recommended
from fedge_contract.secagg.topics import SecAggTopics

if TYPE_CHECKING:
    from aggregator.aggregation.defence import Collector
    from aggregator.aggregation.privacy import PrivacyParams
    from aggregator.config import AggregatorConfig, SecureSettings
    from aggregator.store import Store as StoreType

log = logging.getLogger("fedge.aggregator.secagg")

POLL = 0.5  # seconds between looks at the fleet's presence while a round waits for its cohort
MAX_NOTE = 400  # characters of a round's note (RoundStatus.note)


# ---------------------------------------------------------------- what the round hands the coordinator


@dataclass
class SecureSum:
    """A secure round's sum as the coordinator's close reads it (``own_sum``, Collector-like): the mean the
    protocol revealed, nothing per device. With DP, the mean of equally weighted, device-clipped deltas
    becomes the DP-FedAvg estimate: scaled to the round's target and Gaussian noise added (aggregation/privacy.py)."""

    result: SecureMean
    privacy: PrivacyParams | None = None
    denominator: int = 1  # DP's fixed denominator: the round's target
    rng: np.random.Generator | None = None
    total_weight: float = field(init=False)  # the summed weights, in samples (each device's capped at max_weight)

    def __post_init__(self) -> None:
        self.total_weight = self.result.weight

    @property
    def count(self) -> int:
        return self.result.count

    def add(self, delta: Mapping[str, np.ndarray], weight: float) -> None:
        raise TypeError("a secure round's sum comes from its protocol: nothing is folded into it")

    def mean(self) -> dict[str, np.ndarray]:
        if self.privacy is None:
            return {name: np.asarray(values, dtype=np.float32) for name, values in self.result.delta.items()}
        rng = self.rng or np.random.default_rng()
        std = self.privacy.noise_multiplier * self.privacy.clip_norm
        scale = self.result.count / self.denominator
        return {
            name: (values.astype(np.float64) * scale + rng.normal(0.0, std, size=values.shape) / self.denominator).astype(np.float32)
            for name, values in self.result.delta.items()
        }


@dataclass(frozen=True)
class SecureAdmission:
    """A secure round admits no Update: a device that sends one would put its delta in the clear."""

    number: int
    base_version: int

    def precheck(self, update: Update) -> None:
        if update.base_version < self.base_version or update.round < self.number:
            raise Rejection(ReceiptStatus.STALE, f"round {update.round} on v{update.base_version} is over; round {self.number} "
                                                 f"trains on v{self.base_version}")
        raise Rejection(ReceiptStatus.REJECTED, f"{Reason.SECURE_ROUND.value}: round {self.number} is a secure-aggregation round: "
                                                "it sums masked inputs only, never an update in the clear (an agent without "
                                                "secure aggregation: upgrade it, with pip install 'fedge[secagg]')")

    def commit(self, update: Update, payload: bytes) -> float:
        self.precheck(update)
        raise AssertionError("unreachable")


# ---------------------------------------------------------------- the policy


class SecurePolicy:
    """Synchronous rounds summed by secure aggregation (``[rounds] secure_aggregation``)."""

    mode = "sync"

    def __init__(self, fleet: str, plan: RoundPlan, secagg: SecureSettings, *, max_weight: int = 1000, clip_norm: float | None = None,
                 privacy: PrivacyParams | None = None, dp_seed: int | None = None, cohort: CohortSource | None = None,
                 allowed: frozenset[str] | None = None) -> None:
        self.fleet = fleet
        self.allowed = allowed  # --allow-clients: only these devices are ever invited
        self.plan = plan
        self.secagg = secagg
        # DP-FedAvg weighs every device equally: a weight cap of 1 makes each device's weight in the sum 1
        self.max_weight = 1 if privacy is not None else max_weight
        self.clip_norm = clip_norm
        self.privacy = privacy
        self.rng = np.random.default_rng(dp_seed)  # DP noise (None: OS entropy); tests pass a seed
        self.timeouts = PhaseTimeouts(advertise=secagg.advertise_timeout, share=secagg.share_timeout,
                                      mask=secagg.mask_timeout or plan.timeout, unmask=secagg.unmask_timeout)
        self._cohort = cohort
        self._services: RoundServices | None = None
        _ = self.relay_settings()  # validates the announcement's parameters now, not at the first round

    @classmethod
    def of(cls, config: AggregatorConfig) -> SecurePolicy:
        defence = config.defence
        return cls(config.fleet, config.rounds.plan, config.secagg, max_weight=defence.max_weight or 1000, clip_norm=defence.bound,
                   privacy=config.privacy, dp_seed=defence.dp_seed, allowed=defence.allowed_clients)

    @property
    def minimum(self) -> int:
        """The fewest devices a session opens with (and the fewest inputs its sum may hold, at least)."""
        return max(3, self.plan.min_updates, self.secagg.min_survivors or 0)

    def relay_settings(self, min_survivors: int | None = None) -> SecAggSettings:
        s = self.secagg
        return SecAggSettings(max_weight=self.max_weight, clip=s.clip, ring_bits=s.ring_bits, clip_norm=self.clip_norm, degree=s.degree,
                              threshold=s.threshold, min_survivors=min_survivors or s.min_survivors, timeouts=self.timeouts)

    def min_survivors(self, cohort: int) -> int:
        """The Setup's ``min_survivors`` for a cohort of ``cohort``: the setting, else the protocol's floor and --min."""
        return self.secagg.min_survivors or max(recommended(cohort).min_survivors, self.plan.min_updates)

    def task_extra(self) -> Mapping[str, Any]:
        return self.relay_settings().announcement.to_extra()

    def subscriptions(self, topics: Topics) -> list[str]:
        return [SecAggTopics(topics.fleet).all_from_devices]

    def bind(self, services: RoundServices) -> None:
        self._services = services
        if self._cohort is None:
            self._cohort = online_eligible(services.fleet, cohort_cap(self.plan.target), allowed=self.allowed)

    async def check_in(self, version: int, now: float, db: StoreAccess) -> None:
        """A secure round waits for its devices itself (each session needs its cohort online when it opens)."""
        return None

    def sampling(self) -> None:
        """Sessions invite online devices, not a seeded sample of the fleet: no sampling amplification is claimed."""
        return None

    async def open(self, version: int, now: float, db: StoreAccess) -> Round:
        if self._services is None or self._cohort is None:
            raise RuntimeError("SecurePolicy.open before bind: the coordinator lends its connection first")
        number = version + 1
        sessions = await call(db, Store.secure_sessions, number)
        return SecureRound(self, self._services, self._cohort, db, number, version, opened=now, stored=sessions)


# ---------------------------------------------------------------- a round


class SecureRound:
    """One open secure round: its cohort, its sessions (one at a time) and its sum."""

    def __init__(self, policy: SecurePolicy, services: RoundServices, cohort: CohortSource, db: StoreAccess, number: int,
                 base_version: int, *, opened: float, stored: list[SecureSession]) -> None:
        self.policy = policy
        self.plan = policy.plan
        self.services = services
        self.cohort_source = cohort
        self.db = db
        self.number = number
        self.base_version = base_version
        self.topics = SecAggTopics(policy.fleet)
        self.relay: SecAggRelay | None = None  # the running session's
        self.result: SecureMean | None = None
        self.sessions = 0  # sessions this process opened or resumed for the round
        self.abandoned = sum(s.abandoned for s in stored)  # every session of the round abandoned so far, before a restart too
        self.extensions = 0
        self.stats = {"bytes_in": 0.0, "bytes_out": 0.0, "cpu_seconds": 0.0, "refused": 0.0}  # the relays' RelayStats, summed
        self._cohort: tuple[str, ...] = ()  # the running (or last) session's
        self._spooled = 0  # masked inputs spooled in the running session
        self._resume = _resumable(stored)  # a session that was running (or had its sum) when the aggregator stopped
        self._next_try = opened  # when to look for a cohort (no session running)
        self._wait_until = opened + self.plan.timeout  # the round's own deadline while it waits for devices
        self._hold_until = opened  # no phase ends before this (the coordinator's resend grace)
        self._extend_next = self._resume is None and self.abandoned > 0 and self.abandoned % (policy.secagg.retries + 1) == 0
        self._last_problem = ""  # why the last session of the round ended without a sum
        self._waiting_note = ""

    # ---------------------------------------------------------------- what the coordinator reads

    @property
    def accepted(self) -> int:
        return self.result.count if self.result is not None else self._spooled

    @property
    def target(self) -> int:
        return len(self._cohort) if self._cohort else self.plan.target

    @property
    def min_updates(self) -> int:
        setup = self.relay.setup if self.relay is not None else None
        return setup.min_survivors if setup is not None else self.policy.minimum

    @property
    def deadline(self) -> float | None:
        if self.result is not None:
            return None
        if self.relay is not None:
            return self.relay.next_wake()
        return self._next_try

    @property
    def complete(self) -> bool:
        return self.result is not None

    @property
    def note(self) -> str:
        if self.result is not None:
            text = f"secure aggregation: {self.result.count} of {len(self._cohort)} invited devices summed"
        elif self.relay is not None and (setup := self.relay.setup) is not None and (phase := self.relay.phase) is not None:
            text = f"secure aggregation: session {setup.session}, {phase.value} phase, {len(setup.cohort)} invited"
        else:
            text = self._waiting_note or "secure aggregation: waiting for devices"
        if self._last_problem:
            text += f" (after {self.abandoned} abandoned: {self._last_problem})"
        return text if len(text) <= MAX_NOTE else text[: MAX_NOTE - 3] + "..."

    def admission(self, store: StoreType, *, shard: int | None = None, epoch: int | None = None) -> Admission:
        return SecureAdmission(self.number, self.base_version)

    def factor(self, update: Accepted) -> float:
        return 1.0

    def record(self, accepted: Accepted) -> None:
        log.warning("round %d is secure: update %s of %s (spooled before secure aggregation was turned on?) is not counted",
                    self.number, accepted.update_id, accepted.client_id)

    def metrics(self) -> dict[str, float]:
        return {
            "secure_sessions": float(self.sessions), "secure_abandoned": float(self.abandoned),
            "secure_invited": float(len(self._cohort)), "secure_summed": float(self.accepted),
            **{f"secure_relay_{name}": value for name, value in self.stats.items()},
        }

    def own_sum(self) -> Collector | None:
        if self.result is None:
            return None
        total: Collector = SecureSum(self.result, self.policy.privacy, self.plan.target, self.policy.rng)
        return total

    def owns(self, topic: str) -> bool:
        return self.topics.parse_device(topic) is not None or self.topics.parse_masked_chunk(topic) is not None

    # ---------------------------------------------------------------- events

    async def on_message(self, topic: str, payload: bytes, now: float) -> list[Receipt]:
        relay = self.relay
        if relay is None:
            parsed = self.topics.parse_device(topic)
            if parsed is None or not payload:
                return []  # a chunk no session is fetching, or a retained message being cleared
            return [Refusal(parsed.client_id, topic, Reason.WRONG_SESSION, f"no secure-aggregation session of round {self.number} is "
                            "running", self.number, None).receipt(self.policy.fleet, self.base_version)]
        refusals = await relay.on_message(topic, payload, now=now)
        await self._after(relay, now)
        return [r.receipt(self.policy.fleet, self.base_version) for r in refusals]

    async def on_deadline(self, now: float) -> DeadlineAction:
        relay = self.relay
        if relay is not None:
            for refusal in await relay.on_wake(now=now):  # stalled chunked inputs
                self.services.answer(refusal.receipt(self.policy.fleet, self.base_version), 0)
            await self._after(relay, now)
            return DeadlineAction.CONTINUE
        if self._extend_next:  # retries exhausted: re-announce, then sessions again
            self._extend_next = False
            return self._extend(now)
        if self._resume is not None:
            stored, self._resume = self._resume, None
            await self._resume_session(stored, now)
            return DeadlineAction.CONTINUE
        allowed = self.policy.allowed
        cohort = [c for c in self.cohort_source(self.number) if allowed is None or c in allowed]
        if len(cohort) >= self.plan.target or (now >= self._wait_until and len(cohort) >= self.policy.minimum):
            await self._start(cohort, now)
            return DeadlineAction.CONTINUE
        self._waiting_note = (f"secure aggregation: waiting for devices: {len(cohort)} online and eligible, a session opens with "
                              f"{self.plan.target} (at the deadline with {self.policy.minimum})")
        if now >= self._wait_until:
            log.warning("round %d: %d devices online and eligible, a secure session needs %d: extended", self.number, len(cohort),
                        self.policy.minimum, extra={"round": self.number})
            return self._extend(now)
        self._next_try = now + POLL
        return DeadlineAction.CONTINUE

    def extend_to(self, until: float) -> None:
        self._hold_until = max(self._hold_until, until)
        self._wait_until = max(self._wait_until, until)
        if self.relay is not None:
            self.relay.extend_phase(until)

    async def extend(self, db: StoreAccess) -> None:
        """Nothing to invite: the next session takes its cohort from whoever is online then."""
        return None

    async def invite_newcomers(self, db: StoreAccess, now: float) -> bool:
        return False  # a session's cohort is fixed by its Setup; newcomers join the next one

    def invitation(self) -> InviteSet | None:
        return None  # the announcement invites everyone; the Setup names who takes part

    async def on_reconnect(self) -> None:
        if self.relay is not None:
            await self.relay.republish()

    async def close(self) -> None:
        """The round ended (its sum taken: nothing is left to clear) or the aggregator stops mid-session: empty
        the session's retained topics (a restarted aggregator republishes them when it resumes)."""
        relay, self.relay = self.relay, None
        if relay is not None:
            with contextlib.suppress(Exception):  # a connection already gone: the retained messages stay until resumed
                await relay.close()

    # ---------------------------------------------------------------- sessions

    async def _start(self, cohort: list[str], now: float) -> None:
        settings = self.policy.relay_settings(self.policy.min_survivors(len(cohort)))
        relay = self._relay(settings)
        try:
            setup = await relay.start(self.number, cohort, now=now)
        except ParameterError as exc:  # e.g. a --secagg-threshold the cohort's size cannot give
            self._failed(f"no session could open for {len(cohort)} devices: {exc}", now)
            return
        self._running(relay, setup, spooled=0)

    async def _resume_session(self, stored: SecureSession, now: float) -> None:
        spooled = await call(self.db, Store.secure_inputs, self.number, stored.session)
        try:
            snapshot = _unpack(stored.snapshot)
            relay = await SecAggRelay.resume(
                snapshot, spooled, fleet=self.policy.fleet, transport=self.services.transport, spec=self.services.spec,
                spool=self._spool, checkpoint=self._checkpoint, now=now, settings=self.policy.relay_settings(),
            )
        except ResumeError as exc:
            if stored.outcome == "summed":
                raise SecureResultLost(
                    f"round {self.number}: session {stored.session} had its sum before the aggregator stopped, but the store no longer "
                    f"gives it back ({exc}); a second session would reveal the difference of two sums, so the aggregator stops. "
                    f"Only with that risk accepted: delete the round's rows of secure_sessions in {self.db.store.path}"
                ) from exc
            await call(self.db, Store.secure_abandon, self.number, stored.session, f"abandoned: resume_failed: {exc}")
            self._failed(f"session {stored.session} could not be resumed: {exc}", now)
            return
        log.info("round %d: secure session %s resumed with %d spooled masked inputs", self.number, stored.session, len(spooled),
                 extra={"round": self.number, "session": stored.session})
        assert relay.setup is not None
        self._running(relay, relay.setup, spooled=len(spooled))
        await self._after(relay, now)  # a session that had ended (its sum, or abandoned) ends again at once

    def _relay(self, settings: SecAggSettings) -> SecAggRelay:
        return SecAggRelay(self.policy.fleet, self.services.transport, self.services.spec, spool=self._spool, checkpoint=self._checkpoint,
                           settings=settings)

    def _running(self, relay: SecAggRelay, setup: Setup, *, spooled: int) -> None:
        self.relay, self._cohort, self._spooled = relay, setup.cohort, spooled
        self.sessions += 1
        relay.extend_phase(self._hold_until)

    async def _after(self, relay: SecAggRelay, now: float) -> None:
        """What follows a step of the relay: nothing while the session runs; its sum, or a retry, once it ended."""
        outcome = relay.outcome
        if outcome is None:
            return
        self.relay = None
        for name in self.stats:
            self.stats[name] += float(getattr(relay.stats, name))
        if isinstance(outcome, SecureMean):
            self.result = outcome
            return
        assert isinstance(outcome, Abandoned)
        setup = relay.setup
        self._failed(f"session {setup.session if setup else '?'} abandoned in the {outcome.phase.value} phase: {outcome.reason.value}: "
                     f"{outcome.detail}", now)

    def _failed(self, why: str, now: float) -> None:
        """A session of the round ended without a sum: the next one starts at once, or after an extension."""
        self.abandoned += 1
        self._last_problem = why
        self._spooled, self._waiting_note = 0, ""
        self._next_try = now
        retries = self.policy.secagg.retries
        self._extend_next = self.abandoned % (retries + 1) == 0
        log.warning("round %d: %s; %s", self.number, why,
                    "extending the round" if self._extend_next else "a new session starts (same deltas, new keys)",
                    extra={"round": self.number})

    def _extend(self, now: float) -> DeadlineAction:
        self.extensions += 1
        self._wait_until = now + self.plan.timeout
        self._next_try = now
        return DeadlineAction.EXTEND

    # ---------------------------------------------------------------- the relay's persistence

    async def _spool(self, session: str, client: str, payload: bytes) -> None:
        await call(self.db, Store.secure_spool, self.number, session, client, payload)
        self._spooled += 1

    async def _checkpoint(self, snapshot: dict[str, Any]) -> None:
        server = snapshot["server"]
        session = Setup.from_bytes(server["setup"]).session
        packed: bytes = msgpack.packb(snapshot, use_bin_type=True)
        await call(self.db, Store.secure_checkpoint, self.number, session, packed, _outcome_of(server))


def _resumable(stored: list[SecureSession]) -> SecureSession | None:
    """The session to resume after a restart: the one that had its sum, else the last one still running."""
    live = [s for s in stored if not s.abandoned and s.snapshot is not None]
    return next((s for s in live if s.outcome == "summed"), live[-1] if live else None)


def _outcome_of(server: Mapping[str, Any]) -> str | None:
    """A session snapshot's outcome as the store records it (None: still running)."""
    if server.get("phase") == "done":
        return "summed"
    abandoned = server.get("abandoned")
    if isinstance(abandoned, Mapping):
        return f"abandoned: {abandoned.get('reason')}: {abandoned.get('detail')}"
    return None


def _unpack(blob: bytes | None) -> dict[str, Any]:
    """A stored checkpoint; ResumeError for one that does not decode."""
    try:
        snapshot = msgpack.unpackb(blob or b"", raw=False)
    except Exception as exc:  # msgpack raises several types for damaged bytes
        raise ResumeError(f"the stored checkpoint does not decode ({type(exc).__name__})") from None
    if not isinstance(snapshot, dict):
        raise ResumeError("the stored checkpoint is not a map")
    return snapshot
