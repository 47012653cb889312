"""Faults for ``fedge simulate``: a faulty network per agent, dropouts, late joiners, and the real
faults (the aggregator SIGKILLed mid-round, Mosquitto SIGKILLed and restarted mid-round, both
within a second of each other, the store's disk filling up mid-round).

Every choice (which agents drop out, in which round, whether they come back) comes from the
run's seed, so a chaos run is reproducible in what it does, if not in its timing. What happened
is written to ``chaos.json`` in the report folder.
"""

from __future__ import annotations

import json
import logging
import math
import random
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import TracebackType

from fedge.netem import PROFILES, Fault, FaultProxy, LinkProfile, parse_schedule
from fedge_contract import RoundState, RoundStatus, Topics
from fedge_contract.mqtt import BrokerAddress, Subscriber

log = logging.getLogger("fedge.simulate")


@dataclass(frozen=True)
class ChaosOptions:
    network: str | None = None  # a profile of fedge.netem.PROFILES; None = no proxy unless a knob below needs one
    latency_ms: float | None = None
    jitter_ms: float | None = None
    bandwidth_kbps: float | None = None
    reset_prob: float | None = None
    faults: str = ""  # a fedge.netem schedule, e.g. "agent-7@r3+20"
    dropout: float = 0.0  # fraction of agents that vanish once, mid-training or mid-upload
    dropout_return: float = 10.0  # seconds until half of them come back (the other half: not before the run ends)
    late_joiners: float = 0.0  # fraction of agents started only when round `late_join_round` opens
    late_join_round: int = 2
    kill_aggregator_round: int | None = None  # SIGKILL the aggregator once this round has updates, restart it
    restart_broker_round: int | None = None  # SIGKILL Mosquitto once this round has updates, restart it
    # the double fault of issue 19: the aggregator SIGKILLed once this round has updates, Mosquitto
    # SIGKILLed within a second after it and restarted a few seconds later; the aggregator restarts at once
    double_fault_round: int | None = None
    # fill the store's filesystem once this round has updates: the aggregator must exit with code 74
    # (fedge/failures.py); the space is freed and the aggregator restarted, as its systemd unit would
    fill_store_round: int | None = None

    def validate(self, agents: int, rounds: int) -> None:
        if self.network is not None and self.network not in PROFILES:
            raise ValueError(f"unknown --network {self.network!r} (known: {', '.join(PROFILES)})")
        self.profile()  # validates the knobs
        parse_schedule(self.faults)
        if not 0 <= self.dropout <= 1 or not 0 <= self.late_joiners < 1 or self.dropout_return <= 0:
            raise ValueError("need 0 <= --dropout <= 1, 0 <= --late-joiners < 1 and --dropout-return > 0")
        if not 1 <= self.late_join_round <= rounds:
            raise ValueError(f"--late-join-round must be between 1 and --rounds ({rounds})")
        for name, value in (("--kill-aggregator-at", self.kill_aggregator_round), ("--restart-broker-at", self.restart_broker_round),
                            ("--double-fault-at", self.double_fault_round), ("--fill-store-at", self.fill_store_round)):
            if value is not None and not 1 <= value <= rounds:
                raise ValueError(f"{name} must be between 1 and --rounds ({rounds})")

    def profile(self) -> LinkProfile:
        base = PROFILES[self.network] if self.network else LinkProfile()
        return base.with_overrides(latency_ms=self.latency_ms, jitter_ms=self.jitter_ms,
                                   bandwidth_kbps=self.bandwidth_kbps, reset_prob=self.reset_prob)

    @property
    def needs_proxy(self) -> bool:
        return bool(self.network or not self.profile().is_clean or self.faults or self.dropout)

    @property
    def active(self) -> bool:
        return self.needs_proxy or bool(self.late_joiners or self.kill_aggregator_round or self.restart_broker_round
                                        or self.double_fault_round or self.fill_store_round)


def plan_dropouts(ids: list[str], options: ChaosOptions, rounds: int, seed: int) -> list[Fault]:
    """One vanishing per dropout agent: alternately at the start of training and mid-upload;
    every other pair comes back after ``dropout_return`` s, the rest only after the run."""
    rng = random.Random(f"dropout:{seed}")
    chosen = sorted(rng.sample(ids, round(options.dropout * len(ids))), key=lambda c: int(c.rsplit("-", 1)[1]))
    faults = []
    for k, client in enumerate(chosen):
        seconds = options.dropout_return if k % 4 < 2 else math.inf
        at_round = rng.randint(1, max(1, rounds - 1))
        faults.append(Fault(link=client, seconds=seconds, at_round=at_round, on_upload=k % 2 == 1))
    return faults


def late_ids(ids: list[str], options: ChaosOptions, seed: int) -> list[str]:
    return sorted(random.Random(f"late:{seed}").sample(ids, round(options.late_joiners * len(ids))),
                  key=lambda c: int(c.rsplit("-", 1)[1]))


@dataclass
class ChaosLog:
    dropouts: list[str] = field(default_factory=list)
    late_joiners: list[str] = field(default_factory=list)
    events: list[dict[str, object]] = field(default_factory=list)  # what was done, at which round and accepted count
    missed: list[str] = field(default_factory=list)  # real faults asked for that never struck (their round had no mid-round status)
    links: dict[str, dict[str, int]] = field(default_factory=dict)

    def write(self, out: Path) -> None:
        (out / "chaos.json").write_text(json.dumps(asdict(self), indent=2))


@dataclass
class ChaosHooks:
    """What the controller may do to the run (the runner owns the processes and the broker)."""

    restart_aggregator: Callable[[], Awaitable[None]]
    restart_broker: Callable[[], Awaitable[None]]
    start_late_joiners: Callable[[], Awaitable[None]]
    double_fault: Callable[[], Awaitable[dict[str, object]]]  # returns what it did (timings), for the event
    fill_store: Callable[[], Awaitable[dict[str, object]]]  # returns how the aggregator ended (exit code, its stderr)


class ChaosController(Subscriber):
    """Watches the fleet's status and fires the round-triggered faults; an async context manager."""

    def __init__(self, options: ChaosOptions, address: BrokerAddress, fleet: str, proxy: FaultProxy | None,
                 hooks: ChaosHooks, log_: ChaosLog) -> None:
        self.options = options
        self.proxy = proxy
        self.hooks = hooks
        self.log = log_
        self._opened = 0
        self._done: set[str] = set()
        super().__init__(address, f"fedge-chaos-{fleet}", [Topics(fleet).status])

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        await super().__aexit__(exc_type, exc, tb)
        self.log.missed = self.missed()
        if self.log.missed:
            log.warning("chaos: never struck: %s (no status of the round reported an accepted update before it closed)",
                        ", ".join(self.log.missed))
        if self.proxy is not None:
            self.log.links = {name: dict(vars(link.stats)) for name, link in self.proxy.links.items()}

    def missed(self) -> list[str]:
        """The round-triggered faults asked for that have not struck."""
        asked = {"kill_aggregator": self.options.kill_aggregator_round, "restart_broker": self.options.restart_broker_round,
                 "double_fault": self.options.double_fault_round, "fill_store": self.options.fill_store_round}
        return [f"{name} in round {number}" for name, number in asked.items() if number is not None and name not in self._done]

    async def on_message(self, topic: str, payload: bytes) -> None:
        status = RoundStatus.from_bytes(payload)
        if status.state is RoundState.OPEN:
            await self._on_open(status)

    async def _on_open(self, status: RoundStatus) -> None:
        if status.round > self._opened:
            self._opened = status.round
            if self.proxy is not None:
                self.proxy.notify_round(status.round)
            if self.options.late_joiners and status.round >= self.options.late_join_round:
                await self._once("late_joiners", status, self.hooks.start_late_joiners)
        # the real faults strike mid-round: once the round has its first accepted updates
        if status.accepted >= 1:
            if status.round == self.options.kill_aggregator_round:
                await self._once("kill_aggregator", status, self.hooks.restart_aggregator)
            if status.round == self.options.restart_broker_round:
                await self._once("restart_broker", status, self.hooks.restart_broker)
            if status.round == self.options.double_fault_round:
                await self._once("double_fault", status, self.hooks.double_fault)
            if status.round == self.options.fill_store_round:
                await self._once("fill_store", status, self.hooks.fill_store)

    async def _once(self, name: str, status: RoundStatus, action: Callable[[], Awaitable[dict[str, object] | None]]) -> None:
        if name in self._done:
            return
        self._done.add(name)
        log.warning("chaos: %s in round %d (%d accepted)", name, status.round, status.accepted)
        event: dict[str, object] = {"event": name, "round": status.round, "accepted_before": status.accepted}
        self.log.events.append(event)
        event.update(await action() or {})
