"""Secure rounds (aggregator/rounds/secure.py) at unit level: the round policy with a real store, a real
relay and the agents' real secure-aggregation modules, connected through a broker in memory and a clock
the test moves. Abandoned sessions are retried and then extended, a restarted aggregator resumes from the
store without counting anything twice (or opens a new session when it cannot resume, but never after a
sum), a round waits for its cohort, and plain updates are refused."""

from __future__ import annotations

import collections
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from aggregator.aggregation.privacy import PrivacyParams
from aggregator.config import SecureSettings
from aggregator.errors import Rejection, SecureResultLost
from aggregator.observability.fleet import FleetView
from aggregator.observability.metrics import AggregatorMetrics
from aggregator.rounds import DeadlineAction, RoundServices
from aggregator.rounds.secure import SecureAdmission, SecurePolicy, SecureRound, SecureSum
from aggregator.rounds.secure_cohort import cohort_cap, online_eligible
from aggregator.rounds.sync import RoundPlan
from aggregator.secagg_relay import SecureMean
from aggregator.store import InlineStore, Store
from fedge_contract import GlobalModel, Presence, Receipt, ReceiptStatus, TaskConfig, Update
from fedge_contract.secagg import MaskedInput, Shares
from fedge_contract.secagg.topics import SecAggTopics
from fedge_contract.tensors import ModelSpec
from tests.integration.secure_agents import RecordingSecure

FLEET = "lab"
SPEC = ModelSpec.of({"w": np.zeros((4, 3), np.float32), "b": np.zeros(3, np.float32)})
TOPICS = SecAggTopics(FLEET)
SECAGG = SecureSettings(advertise_timeout=10.0, share_timeout=10.0, mask_timeout=30.0, unmask_timeout=10.0)


class Memory:
    """A broker in memory: what the relay publishes reaches the devices subscribed to it, what devices publish the round."""

    def __init__(self) -> None:
        self.down: collections.deque[tuple[str, bytes]] = collections.deque()
        self.up: collections.deque[tuple[str, bytes]] = collections.deque()
        self.retained: dict[str, bytes] = {}

    async def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> None:
        if retain:
            if payload:
                self.retained[topic] = payload
            else:
                self.retained.pop(topic, None)
        self.down.append((topic, payload))

    async def subscribe(self, topic: str) -> None:
        pass

    async def unsubscribe(self, topic: str) -> None:
        pass


class Uplink:
    def __init__(self, memory: Memory) -> None:
        self.memory = memory

    async def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> None:
        self.memory.up.append((topic, payload))


class Harness:
    def __init__(self, tmp: Path, n: int = 5, *, secagg: SecureSettings = SECAGG, plan: RoundPlan | None = None,
                 lose: dict[str, dict[int, type]] | None = None, privacy: PrivacyParams | None = None) -> None:
        self.tmp, self.secagg, self.privacy = tmp, secagg, privacy
        self.plan = plan or RoundPlan(target=n, min_updates=1, timeout=60.0)
        self.memory = Memory()
        self.clients = [f"dev-{i}" for i in range(n)]
        self.devices = {c: RecordingSecure(lose=(lose or {}).get(c), fleet=FLEET, client_id=c, state_dir=tmp / c, max_message_bytes=1 << 20)
                        for c in self.clients}
        for device in self.devices.values():
            device.attach(Uplink(self.memory), SPEC)
        self.receipts: list[Receipt] = []
        self.cohort: list[str] = list(self.clients)
        self.now = 1000.0
        self.store = Store(tmp / "agg.sqlite")
        self.db = InlineStore(self.store)
        self.policy = self.new_policy()
        rng = np.random.default_rng(3)
        self.deltas = {c: ({t.name: rng.normal(0, 0.05, t.shape).astype(np.float32) for t in SPEC.tensors}, int(rng.integers(10, 90)))
                       for c in self.clients}

    def new_policy(self) -> SecurePolicy:
        """The aggregator's policy, as a (re)started aggregator builds it."""
        policy = SecurePolicy(FLEET, self.plan, self.secagg, privacy=self.privacy, dp_seed=0, cohort=lambda _: sorted(self.cohort))
        fleet = FleetView(FLEET, AggregatorMetrics())
        policy.bind(RoundServices(self.memory, SPEC, fleet, lambda receipt, n: self.receipts.append(receipt)))  # type: ignore[arg-type]
        return policy

    async def open(self, round_no: int = 1) -> SecureRound:
        return await self.policy.open(round_no - 1, self.now, self.db)

    async def announce(self, round_no: int = 1, *, without: tuple[str, ...] = ()) -> None:
        model = GlobalModel(FLEET, round_no - 1, round_no, None, TaskConfig(codec="none", extra=dict(self.policy.task_extra())),
                            SPEC.fingerprint, ())
        for client, device in self.devices.items():
            await device.on_announcement(model)
            if client not in without:
                await device.submit(model, *self.deltas[client])

    async def submit(self, client: str, round_no: int = 1) -> None:
        model = GlobalModel(FLEET, round_no - 1, round_no, None, TaskConfig(codec="none", extra=dict(self.policy.task_extra())),
                            SPEC.fingerprint, ())
        await self.devices[client].submit(model, *self.deltas[client])

    async def pump(self, rnd: SecureRound) -> None:
        """Deliver every message in flight, both ways, until none is left."""
        while self.memory.down or self.memory.up:
            while self.memory.down:
                topic, payload = self.memory.down.popleft()
                for device in self.devices.values():
                    if device.owns(topic):
                        await device.on_message(topic, payload)
            while self.memory.up:
                topic, payload = self.memory.up.popleft()
                assert rnd.owns(topic), topic
                self.receipts += await rnd.on_message(topic, payload, self.now)

    async def run(self, rnd: SecureRound, *, until: Any = None, steps: int = 50) -> list[DeadlineAction]:
        """Messages, then the clock to the round's next deadline, until it is complete (or ``until(rnd)``)."""
        actions = []
        for _ in range(steps):
            await self.pump(rnd)
            if rnd.complete or (until is not None and until(rnd)):
                return actions
            deadline = rnd.deadline
            assert deadline is not None
            self.now = max(self.now, deadline)
            actions.append(await rnd.on_deadline(self.now))
        raise AssertionError(f"no outcome after {steps} steps: {rnd.note}")

    def fedavg(self, members: list[str], max_weight: int = 1000) -> dict[str, np.ndarray]:
        weights = {m: min(self.deltas[m][1], max_weight) for m in members}
        return {t.name: sum(self.deltas[m][0][t.name].astype(np.float64) * weights[m] for m in members) / sum(weights.values())  # type: ignore[misc]
                for t in SPEC.tensors}

    def rows(self, table: str) -> list[tuple[Any, ...]]:
        return self.store._db.execute(f"SELECT * FROM {table}").fetchall()


def _assert_mean(rnd: SecureRound, expected: dict[str, np.ndarray]) -> None:
    total = rnd.own_sum()
    assert total is not None
    mean = total.mean()
    for name, values in expected.items():
        np.testing.assert_allclose(mean[name], values, atol=1e-5)


async def test_a_round_sums_its_cohort_spools_masked_inputs_and_keeps_checkpoints(tmp_path):
    h = Harness(tmp_path)
    rnd = await h.open()
    await h.announce()
    actions = await h.run(rnd)
    assert actions == [DeadlineAction.CONTINUE]  # the session opened at the first look; every phase ended early
    assert rnd.complete and rnd.accepted == 5 and rnd.deadline is None
    _assert_mean(rnd, h.fedavg(h.clients))
    assert rnd.metrics()["secure_summed"] == 5 and rnd.metrics()["secure_sessions"] == 1 and rnd.own_sum().total_weight == pytest.approx(
        sum(n for _, n in h.deltas.values()))
    inputs = h.rows("secure_inputs")
    assert sorted(row[2] for row in inputs) == h.clients  # spooled once each, by (round, session, client)
    (session,) = h.store.secure_sessions(1)
    assert session.outcome == "summed" and session.snapshot is not None
    assert h.receipts == [] and h.memory.retained == {}  # nothing refused; the session's retained topics emptied
    assert "5 of 5 invited devices summed" in rnd.note

    h.store.close_round(1, 1, SPEC.fingerprint, {t.name: np.zeros(t.shape, np.float32) for t in SPEC.tensors}, {}, 5)
    assert h.rows("secure_inputs") == [] and h.store.secure_sessions(1)[0].snapshot is None  # released with the round


async def test_an_abandoned_session_is_retried_at_once_with_nothing_half_folded(tmp_path):
    lose = {"dev-0": {1: Shares}, "dev-1": {1: Shares}, "dev-2": {1: Shares}}  # 2 inputs left: below min_survivors 3
    h = Harness(tmp_path, lose=lose)
    rnd = await h.open()
    await h.announce()
    notes: list[str] = []
    actions = await h.run(rnd, until=lambda r: notes.append(r.note) or False)
    assert rnd.complete and rnd.accepted == 5  # the retry counted everyone, each once
    _assert_mean(rnd, h.fedavg(h.clients))
    assert actions.count(DeadlineAction.EXTEND) == 0
    assert rnd.metrics()["secure_abandoned"] == 1 and rnd.metrics()["secure_sessions"] == 2
    assert any("abandoned in the mask phase: below_threshold: 2 masked inputs, fewer than min_survivors 3" in n for n in notes)
    first, second = h.store.secure_sessions(1)
    assert first.abandoned and "below_threshold" in (first.outcome or "") and second.outcome == "summed"
    assert {row[1] for row in h.rows("secure_inputs")} == {second.session}  # the abandoned session's inputs were dropped with it


async def test_retries_exhausted_extend_the_round_then_sessions_start_again(tmp_path):
    lose = {c: {1: Shares} for c in ("dev-0", "dev-1", "dev-2")}
    h = Harness(tmp_path, lose=lose, secagg=SecureSettings(**{**SECAGG.__dict__, "retries": 0}))
    rnd = await h.open()
    await h.announce()
    actions = await h.run(rnd)
    assert actions.count(DeadlineAction.EXTEND) == 1 and rnd.extensions == 1
    assert rnd.complete and rnd.accepted == 5


async def test_a_round_waits_for_its_cohort_and_extends_when_too_few_devices_come(tmp_path):
    h = Harness(tmp_path, plan=RoundPlan(target=4, min_updates=1, timeout=20.0))
    h.cohort = ["dev-0", "dev-1"]
    rnd = await h.open()
    await h.announce()
    actions = await h.run(rnd, until=lambda r: r.extensions == 1)
    assert set(actions[:-1]) == {DeadlineAction.CONTINUE} and actions[-1] is DeadlineAction.EXTEND and h.now == pytest.approx(1020.0)
    assert rnd.relay is None and "2 online and eligible" in rnd.note
    h.cohort = ["dev-0", "dev-1", "dev-2"]  # enough for a session at the deadline, not the target 4
    actions = await h.run(rnd)
    assert rnd.complete and rnd.accepted == 3 and h.now == pytest.approx(1040.0)
    _assert_mean(rnd, h.fedavg(["dev-0", "dev-1", "dev-2"]))


async def test_a_restarted_aggregator_resumes_the_session_without_counting_twice(tmp_path):
    h = Harness(tmp_path)
    rnd = await h.open()
    await h.announce(without=("dev-4",))  # dev-4 still trains when the aggregator stops
    await h.run(rnd, until=lambda r: r.accepted == 4)
    assert rnd.relay is not None and rnd.relay.phase is not None and rnd.relay.phase.value == "mask"

    h.policy = h.new_policy()  # the aggregator restarts: a new policy and round from the same store
    resumed = await h.open()
    await h.submit("dev-4")  # published while the aggregator was away
    actions = await h.run(resumed)
    assert actions[0] is DeadlineAction.CONTINUE and resumed.sessions == 1 and resumed.abandoned == 0
    assert resumed.complete and resumed.accepted == 5
    _assert_mean(resumed, h.fedavg(h.clients))  # the four spooled inputs counted once, whatever the devices resent
    assert len(h.store.secure_sessions(1)) == 1


async def test_a_session_that_cannot_be_resumed_is_abandoned_and_a_new_one_counts_everyone_once(tmp_path):
    h = Harness(tmp_path)
    rnd = await h.open()
    await h.announce(without=("dev-4",))
    await h.run(rnd, until=lambda r: r.accepted == 4)
    h.store._db.execute("UPDATE secure_sessions SET snapshot=x'c1c1'")  # a damaged checkpoint

    h.policy = h.new_policy()
    resumed = await h.open()
    await h.submit("dev-4")
    await h.run(resumed)
    assert resumed.complete and resumed.accepted == 5 and resumed.abandoned == 1
    _assert_mean(resumed, h.fedavg(h.clients))
    first, second = h.store.secure_sessions(1)
    assert (first.outcome or "").startswith("abandoned: resume_failed") and second.outcome == "summed"


async def test_a_session_that_had_its_sum_is_never_followed_by_another(tmp_path):
    h = Harness(tmp_path)
    rnd = await h.open()
    await h.announce()
    await h.run(rnd)
    assert rnd.complete  # ... and the aggregator stops before the round's model is committed

    h.policy = h.new_policy()
    resumed = await h.open()
    await h.run(resumed)  # resumes to the same sum
    assert resumed.complete and resumed.sessions == 1 and len(h.store.secure_sessions(1)) == 1
    _assert_mean(resumed, h.fedavg(h.clients))

    h.store._db.execute("DELETE FROM secure_inputs")  # a damaged spool: the sum cannot be recomputed
    h.policy = h.new_policy()
    again = await h.open()
    with pytest.raises(SecureResultLost, match="a second session would reveal the difference of two sums"):
        await h.run(again)
    assert len(h.store.secure_sessions(1)) == 1  # no second session was opened


async def test_messages_with_no_session_running_are_refused_and_plain_updates_are_refused(tmp_path):
    h = Harness(tmp_path)
    rnd = await h.open()
    (receipt,) = await rnd.on_message(TOPICS.device(MaskedInput, "dev-0"), b"x", h.now)
    assert receipt.status is ReceiptStatus.REJECTED and receipt.reason.startswith("wrong_session: no secure-aggregation session")
    assert await rnd.on_message(TOPICS.masked_chunks("dev-0", "s") + "/0", b"x", h.now) == []

    admission = rnd.admission(h.store)
    update = Update(FLEET, "dev-0", "u-1", 1, 0, 10, ())
    with pytest.raises(Rejection) as refused:
        admission.precheck(update)
    assert refused.value.status is ReceiptStatus.REJECTED and refused.value.reason.startswith("secure_round: round 1 is a secure")
    with pytest.raises(Rejection) as stale:
        SecureAdmission(3, 2).commit(update, b"")
    assert stale.value.status is ReceiptStatus.STALE


def test_secure_sum_adds_dp_noise_to_the_equally_weighted_mean():
    delta = {"w": np.full(20_000, 0.5, np.float32)}
    result = SecureMean(1, "s", delta, weight=4.0, count=4, survivors=("a", "b", "c", "d"), aggregate=None)  # type: ignore[arg-type]
    assert SecureSum(result).mean()["w"][0] == 0.5
    privacy = PrivacyParams(noise_multiplier=1.0, clip_norm=2.0)
    noisy = SecureSum(result, privacy, denominator=8, rng=np.random.default_rng(0)).mean()["w"]
    assert np.mean(noisy) == pytest.approx(0.25, abs=0.01)  # 4 of a target of 8: the fixed denominator
    assert np.std(noisy) == pytest.approx(2.0 / 8, rel=0.05)  # noise std z x C over the denominator
    policy = SecurePolicy(FLEET, RoundPlan(8, 1, 60.0), SECAGG, max_weight=500, clip_norm=2.0, privacy=privacy)
    assert policy.task_extra() == {"secure_aggregation": {"max_weight": 1, "clip_norm": 2.0}}  # every device weighs 1
    with pytest.raises(TypeError):
        SecureSum(result).add(delta, 1.0)


def test_the_cohort_is_the_online_eligible_devices_capped_and_seeded():
    fleet = FleetView(FLEET, AggregatorMetrics())
    for i in range(30):
        fleet.on_presence(f"d{i:02d}", Presence(FLEET, f"d{i:02d}", "online" if i < 25 else "offline",
                                                 eligible=None if i == 0 else i % 5 != 1).to_bytes())
    assert cohort_cap(10) == 13 and cohort_cap(1) == 2
    everyone = online_eligible(fleet, cap=100)(1)
    assert everyone == sorted(f"d{i:02d}" for i in range(25) if i % 5 != 1)  # offline and not eligible left out; unknown counts
    picked = online_eligible(fleet, cap=13)
    assert len(picked(1)) == 13 and set(picked(1)) <= set(everyone) and picked(1) == picked(1) and picked(1) != picked(2)
    assert online_eligible(fleet, cap=100, allowed=frozenset({"d02", "d03", "d06", "d29"}))(1) == ["d02", "d03"]  # --allow-clients


async def test_only_allowed_clients_are_invited(tmp_path):
    h = Harness(tmp_path)
    h.policy = SecurePolicy(FLEET, RoundPlan(target=4, min_updates=1, timeout=60.0), SECAGG, cohort=lambda _: list(h.clients),
                            allowed=frozenset(h.clients[:4]))
    h.policy.bind(RoundServices(h.memory, SPEC, FleetView(FLEET, AggregatorMetrics()), lambda r, n: None))  # type: ignore[arg-type]
    rnd = await h.open()
    await h.announce()
    await h.run(rnd)
    assert rnd.complete and rnd.target == 4 and rnd.accepted == 4  # dev-4 is not on the allowlist: never invited
    _assert_mean(rnd, h.fedavg(h.clients[:4]))
