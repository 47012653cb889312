"""Orchestrates a simulated fleet: broker, aggregator process, agent process(es), wire tap, report.

The orchestrator itself never imports torch: it only watches the broker, so its numbers are the
system's, not its own. Children are real ``fedge`` processes (the aggregator exactly as a user
runs it), which is also what lets fault-injection tests kill them.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console

from aggregator.store import Store
from broker import LocalBroker
from fedge.errors import CommandError
from fedge.netem import FaultProxy, LinkProfile, parse_schedule
from fedge.peak_memory import ENV as PEAK_ENV
from fedge.peak_memory import peak_rss_mib, proc_peak_rss_mib
from fedge.simulate.chaos import ChaosController, ChaosHooks, ChaosLog, ChaosOptions, late_ids, plan_dropouts
from fedge.simulate.disk_full import check_fillable
from fedge.simulate.limits import raise_fd_limit
from fedge.simulate.process_faults import ProcessFaults
from fedge.simulate.report import RoundRow, SimulationReport, write_report
from fedge.simulate.wiretap import WireTap
from fedge.status import snapshot
from fedge_contract.aio import First, cancel_and_wait, race
from fedge_contract.mqtt import BrokerAddress

FLEET = "sim"


@dataclass(frozen=True)
class SimulationOptions:
    agents: int = 20
    rounds: int = 30
    alpha: float = 0.5
    seed: int = 0
    target: int | None = None  # default: every agent, every round
    min_updates: int | None = None  # default: the target
    deadline: float = 60.0
    strategy: str = "fedavg"
    strategy_flags: list[str] = field(default_factory=list)  # server optimiser and async-mode flags, passed to the aggregator
    global_codec: str = "none"
    training: dict[str, Any] = field(default_factory=dict)
    stragglers: float = 0.0  # fraction of agents (chosen with the seed) made `slowdown` times slower
    slowdown: float = 5.0
    emulated_train_seconds: float = 0.0  # every agent's training lasts at least this long (see AgentConfig)
    attacks: dict[str, str] = field(default_factory=dict)  # TEST ONLY: client id -> attack (edge_agent/attack.py)
    chaos: ChaosOptions = field(default_factory=ChaosOptions)  # faulty network, dropouts, late joiners, kills (chaos.py)
    out: Path | None = None
    store: Path | None = None  # the aggregator's store; default OUT/aggregator.sqlite
    agent_procs: int = 1
    quiet: bool = False
    log_level: str = "info"
    log_json: bool = False  # children log JSON lines (fedge_runtime/logs.py)
    timeout: float = 3600.0  # give up on a run that makes no progress for this long
    # Load mode (fedge/simulate/synthetic.py): agents send seeded noise of a `params`-value model
    # (task `synthetic`) encoded with the round's codec, instead of training digits.
    synthetic: bool = False
    params: int = 1_000_000
    downloads: str = "host"  # synthetic: who downloads the global model, each host once or every agent
    workers: int | None = None  # passed to `fedge aggregator --workers` when given
    task_extra: dict[str, str] = field(default_factory=dict)  # more task options (e.g. digits' min_samples=5 for 100 devices)

    def __post_init__(self) -> None:
        if self.agents < 1 or self.rounds < 1:
            raise ValueError("--agents and --rounds must be >= 1")
        if not 1 <= self.agent_procs <= self.agents:
            raise ValueError("--agent-procs must be between 1 and --agents")
        if not 0 <= self.stragglers <= 1 or self.slowdown < 1 or self.emulated_train_seconds < 0:
            raise ValueError("need 0 <= --stragglers <= 1, --slowdown >= 1 and --emulated-train-seconds >= 0")
        if self.target is not None and not 1 <= self.target <= self.agents:
            raise ValueError(f"--target must be between 1 and --agents ({self.agents})")
        self.chaos.validate(self.agents, self.rounds)
        if self.synthetic:
            from fedge.simulate.synthetic import DOWNLOADS

            if self.chaos.active or self.attacks or self.stragglers or self.emulated_train_seconds:
                raise ValueError("--synthetic measures the transport and the aggregator: it takes no faults, attacks or stragglers")
            if self.downloads not in DOWNLOADS:
                raise ValueError(f"--downloads must be one of {', '.join(DOWNLOADS)}")
            if self.params < 8:
                raise ValueError("--params must be >= 8")
        if self.workers is not None and self.workers < 0:
            raise ValueError("--workers must be >= 0")

    @property
    def effective_target(self) -> int:
        return self.target or self.agents

    @property
    def effective_min(self) -> int:
        return min(self.min_updates or self.effective_target, self.effective_target)

    def slow_ids(self, ids: list[str]) -> list[str]:
        return sorted(random.Random(self.seed).sample(ids, round(self.stragglers * len(ids))))

    @property
    def task(self) -> str:
        return "synthetic" if self.synthetic else "digits"

    def task_options(self) -> list[str]:
        if self.synthetic:
            opts: dict[str, Any] = {"params": self.params, "init_seed": self.seed}
        else:
            opts = {"clients": self.agents, "alpha": self.alpha, "seed": self.seed, "init_seed": self.seed}
        return [f"--task-opt={k}={v}" for k, v in {**opts, **self.task_extra}.items()]

    @property
    def global_subscribers(self) -> int:
        """Connections that download each global model: every agent, or one per synthetic host."""
        return self.agent_procs if self.synthetic and self.downloads == "host" else self.agents


SYNTHETIC_AGENTS_PER_HOST = 2500  # 10,000 connections in 4 processes: ~50 s to connect, ~300-400 MiB each (README, bench/participation)


def default_agent_procs(agents: int, synthetic: bool) -> int:
    """Host processes when --hosts is not given: one for trained agents (they share one torch), a
    few for synthetic ones (each holds its agents' connections and sessions on one event loop)."""
    return max(1, -(-agents // SYNTHETIC_AGENTS_PER_HOST)) if synthetic else 1


def _flags(training: dict[str, Any]) -> list[str]:
    return [f"--{key.replace('_', '-')}={value}" for key, value in training.items()]


def aggregator_argv(options: SimulationOptions, broker_url: str, store: Path) -> tuple[str, ...]:
    """The run's ``fedge aggregator`` command line (after ``python -m fedge``)."""
    return (
        "aggregator", f"--broker={broker_url}", f"--fleet={FLEET}", f"--task={options.task}", *options.task_options(),
        f"--rounds={options.rounds}", f"--target={options.effective_target}", f"--min={options.effective_min}",
        f"--deadline={options.deadline}", f"--strategy={options.strategy}", f"--global-codec={options.global_codec}",
        f"--store={store}", *options.strategy_flags, *_flags(options.training),
        *([f"--workers={options.workers}"] if options.workers is not None else []),
        # synthetic agents read only whole GlobalModels (the shapes and the codec): they rebuild no held model
        *(["--no-delta-broadcasts"] if options.synthetic else []),
    )


class _Children:
    """The child processes of a run; leaving the context stops any still running."""

    def __init__(self, out: Path, log_level: str, log_json: bool = False) -> None:
        self.out = out
        self.log_level = log_level
        self.log_flags = ["--log-json"] if log_json else []
        self.processes: dict[str, asyncio.subprocess.Process] = {}
        self.killed: set[str] = set()  # children killed on purpose (chaos): their exit is not a failure
        self.exited = asyncio.Event()  # set whenever a child exits: the run's watcher then looks for a failure
        self._exit_watchers: list[asyncio.Task[int]] = []

    async def spawn(self, name: str, *args: str) -> asyncio.subprocess.Process:
        env = {**os.environ, PEAK_ENV: str(self.out / "peaks" / f"{name}.json"), "PYTHONUNBUFFERED": "1"}
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "fedge", *args, f"--log-file={self.out / 'logs' / f'{name}.log'}", f"--log-level={self.log_level}", *self.log_flags,
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE, env=env,
        )
        self.processes[name] = process
        watcher = asyncio.create_task(process.wait(), name=f"exit:{name}")
        watcher.add_done_callback(lambda _: self.exited.set())
        self._exit_watchers.append(watcher)
        return process

    async def stop_all(self) -> None:
        for process in self.processes.values():
            if process.returncode is None:
                process.terminate()
        for process in self.processes.values():
            try:
                await asyncio.wait_for(process.wait(), 10)
            except TimeoutError:
                process.kill()
                await process.wait()
        await cancel_and_wait(self._exit_watchers)

    async def failure(self) -> str | None:
        """The first child that exited with an error, with the end of its stderr."""
        for name, process in self.processes.items():
            if process.returncode not in (None, 0) and name not in self.killed:
                err = (await process.stderr.read()).decode(errors="replace") if process.stderr else ""
                return f"{name} exited with {process.returncode}: {err.strip()[-2000:]} (see {self.out / 'logs' / (name + '.log')})"
        return None


@contextlib.asynccontextmanager
async def _children(out: Path, log_level: str, log_json: bool = False) -> AsyncIterator[_Children]:
    children = _Children(out, log_level, log_json)
    try:
        yield children
    finally:
        await asyncio.shield(children.stop_all())


async def simulate(options: SimulationOptions) -> int:
    console = Console(stderr=False)
    started = time.monotonic()
    out = options.out or Path("runs") / time.strftime("sim-%Y%m%d-%H%M%S")
    out.mkdir(parents=True, exist_ok=True)
    for sub in ("logs", "peaks", "agents"):
        (out / sub).mkdir(exist_ok=True)
    store_path = options.store or out / "aggregator.sqlite"
    if store_path.exists():
        raise CommandError(f"{store_path} already holds a run: choose another {'--store' if options.store else '--out'}")
    store_path.parent.mkdir(parents=True, exist_ok=True)
    if options.chaos.fill_store_round is not None:
        try:
            check_fillable(store_path.parent)
        except ValueError as exc:
            raise CommandError(str(exc)) from None
    console.print(f"[bold]fedge simulate[/]: {options.agents} agents, {options.rounds} rounds, target {options.effective_target}, report in {out}")

    raise_fd_limit(options.agents + 256)  # before the broker starts: it inherits the limit, one socket per agent
    async with LocalBroker(data_dir=out / "broker") as broker_proc:
        address = BrokerAddress.parse(broker_proc.url)
        # Synthetic load: the tap does not take a copy of every update (that would double the
        # broker's egress and load this process); bytes up come from the hosts' ledgers instead.
        tap = WireTap(address, FLEET, subscribers=options.global_subscribers, updates=not options.synthetic)
        async with tap, _children(out, options.log_level, options.log_json) as children:
            aggregator_args = aggregator_argv(options, broker_proc.url, store_path)
            await children.spawn("aggregator", *aggregator_args)
            ids = [f"agent-{i}" for i in range(options.agents)]
            faults = ProcessFaults(children, broker_proc, aggregator_args, store_path, options.seed)
            async with _chaos(options, broker_proc, children, faults, ids, out) as spawn_agents:
                await spawn_agents([i for i in ids if i not in spawn_agents.late], options.agent_procs, "agents")
                error = await _watch(tap, children, options, console)
                spawn_agents.heal()  # agents cut off for good come back to see the final model and exit
                if not error:
                    for _name, process in list(children.processes.items()):  # agents exit on the final model
                        await asyncio.wait_for(process.wait(), 60)
            if error:
                console.print(f"[red]simulation failed[/]: {error}")
                return 1
        # every device's retained presence once all are gone, as `fedge status --once` shows it
        dropped = {client: presence.dropped for client, presence in (await snapshot(address, FLEET)).devices.items()}
        broker_peak = proc_peak_rss_mib(broker_proc.pid) if broker_proc.pid else None

    wall = time.monotonic() - started
    report = _build_report(options, out, store_path, tap, wall, broker_peak, dropped)
    write_report(report, out, console)
    return 0


async def _watch(tap: WireTap, children: _Children, options: SimulationOptions, console: Console) -> str | None:
    """Print progress until the aggregator finishes; a child's crash or a stall is an error."""
    while True:
        children.exited.clear()  # before looking: an exit from now on wakes the wait below
        failure = await children.failure()
        if failure:
            return failure
        if tap.finished.is_set():
            return None
        try:
            async with asyncio.timeout(options.timeout):
                won = await race(tap.progress.get(), race(tap.finished.wait(), children.exited.wait()))
        except TimeoutError:
            return f"no progress for {options.timeout:.0f}s"
        if isinstance(won, First) and not options.quiet:
            console.print(f"round {won.value.round:>3}/{options.rounds}: {won.value.accepted} updates in, aggregating")


class _AgentSpawner:
    """Starts agent hosts, each agent through its own proxy link when the network is faulty."""

    def __init__(self, options: SimulationOptions, children: _Children, broker_url: str, out: Path,
                 proxy: FaultProxy | None, late: list[str]) -> None:
        self.options, self.children, self.broker_url, self.out, self.proxy, self.late = options, children, broker_url, out, proxy, late

    async def __call__(self, ids: list[str], procs: int, prefix: str) -> None:
        options = self.options
        if options.synthetic:
            for p in range(min(procs, len(ids))):
                name = f"{prefix}-{p}"
                await self.children.spawn(
                    name, "_agent-host", "--synthetic", f"--broker={self.broker_url}", f"--fleet={FLEET}",
                    f"--client-ids={','.join(ids[p::procs])}", f"--state-root={self.out / 'agents'}",
                    f"--seed={options.seed}", f"--downloads={options.downloads}", f"--ledger={self.out / 'agents' / (name + '.json')}",
                )
            return
        slow = options.slow_ids([f"agent-{i}" for i in range(options.agents)])
        for p in range(min(procs, len(ids))):
            group = ids[p::procs]
            urls = [self.proxy.link(i).url for i in group] if self.proxy else []
            name = f"{prefix}-{p}"
            await self.children.spawn(
                name, "_agent-host", f"--broker={self.broker_url}", f"--fleet={FLEET}",
                f"--client-ids={','.join(group)}", f"--state-root={self.out / 'agents'}", f"--ledger={self.out / 'agents' / (name + '.json')}",
                *([f"--broker-urls={','.join(urls)}"] if urls else []),
                "--task=digits", *options.task_options(), f"--seed={options.seed}",
                f"--slow-ids={','.join(slow)}", f"--slowdown={options.slowdown}",
                f"--emulated-train-seconds={options.emulated_train_seconds}",
                f"--attacks={','.join(f'{k}={v}' for k, v in options.attacks.items())}",
            )

    def heal(self) -> None:
        """The run is over: every link heals and turns clean, so every agent can fetch the final model."""
        if self.proxy is not None:
            for link in self.proxy.links.values():
                link.profile = LinkProfile()
            self.proxy.heal_all()


@contextlib.asynccontextmanager
async def _chaos(options: SimulationOptions, broker: LocalBroker, children: _Children, faults: ProcessFaults,
                 ids: list[str], out: Path) -> AsyncIterator[_AgentSpawner]:
    """The run's faults (chaos.py): a FaultProxy with one link per agent and a controller, when asked for."""
    chaos = options.chaos
    record = ChaosLog(late_joiners=late_ids(ids, chaos, options.seed))
    try:
        async with contextlib.AsyncExitStack() as stack:
            yield await _enter_chaos(stack, options, broker, children, faults, ids, out, record)
    finally:
        if chaos.active:
            record.write(out)


async def _enter_chaos(stack: contextlib.AsyncExitStack, options: SimulationOptions, broker: LocalBroker, children: _Children,
                       faults: ProcessFaults, ids: list[str], out: Path, record: ChaosLog) -> _AgentSpawner:
    chaos = options.chaos
    proxy = None
    if chaos.needs_proxy:
        proxy = await stack.enter_async_context(FaultProxy(seed=options.seed))
        for client in ids:
            await proxy.add_link(client, (broker.host, broker.port), chaos.profile())
        dropouts = plan_dropouts([i for i in ids if i not in record.late_joiners], chaos, options.rounds, options.seed)
        record.dropouts = [str(f) for f in dropouts]
        proxy.schedule([*parse_schedule(chaos.faults), *dropouts])
    spawner = _AgentSpawner(options, children, broker.url, out, proxy, record.late_joiners)
    if chaos.active:
        hooks = ChaosHooks(faults.restart_aggregator, faults.restart_broker, lambda: spawner(record.late_joiners, 1, "agents-late"),
                           faults.double_fault, faults.fill_store)
        await stack.enter_async_context(ChaosController(chaos, BrokerAddress.parse(broker.url), FLEET, proxy, hooks, record))
    return spawner


def _build_report(options: SimulationOptions, out: Path, store_path: Path, tap: WireTap, wall: float,
                  broker_peak: float | None, dropped: dict[str, int]) -> SimulationReport:
    with Store(store_path, readonly=True) as store:
        stored = {row["round"]: row for row in store.rounds()}
    hosts = _host_ledgers(out) if options.synthetic else {}
    devices = {} if options.synthetic else {client: row for ledger in _host_ledgers(out).values() for client, row in ledger["devices"].items()}
    rows = []
    for number in sorted(stored):
        traffic = tap.rounds[number]
        trained = evals = None
        if options.synthetic:  # what the hosts published (the tap does not copy updates in this mode)
            published = [ledger["rounds"].get(str(number), {}) for ledger in hosts.values()]
            updates, bytes_up = int(sum(p.get("updates", 0) for p in published)), int(sum(p.get("bytes", 0) for p in published))
            trained, evals = int(sum(p.get("trained", 0) for p in published)), int(sum(p.get("evals", 0) for p in published))
        else:
            updates, bytes_up = traffic.updates, traffic.bytes_up
        metrics = stored[number]["metrics"]
        seconds = (traffic.closed_at - traffic.opened_at) if traffic.closed_at and traffic.opened_at else float("nan")
        rows.append(
            RoundRow(
                round=number, accuracy=metrics.get("accuracy", float("nan")), loss=metrics.get("loss", float("nan")),
                participants=int(stored[number]["accepted"]), bytes_up=bytes_up, bytes_down=tap.bytes_down(number),
                updates_published=updates, seconds=seconds, selection_bytes=traffic.selection_bytes, trained=trained, evals=evals,
                train_seconds=None if options.synthetic else traffic.train_seconds, bytes_retained=traffic.retained_bytes,
                invited=int(metrics["invited"]) if "invited" in metrics else None,
                fed_accuracy=metrics.get("fed_accuracy"), fed_devices=int(metrics["fed_devices"]) if "fed_devices" in metrics else None,
            )
        )
    peaks = {"orchestrator": peak_rss_mib()}
    for path in (out / "peaks").glob("*.json"):
        data = json.loads(path.read_text())
        peaks[path.stem] = data["peak_rss_mib"]
    if broker_peak is not None:
        peaks["mosquitto"] = broker_peak
    return SimulationReport(
        options={k: (str(v) if isinstance(v, Path) else v) for k, v in options.__dict__.items()},
        rounds=rows,
        wall_seconds=wall,
        peak_rss_mib=peaks,
        final_global_bytes=tap.final_global_bytes,
        unattributed_bytes=tap.unattributed_bytes,
        hosts={name: {k: v for k, v in ledger.items() if k != "rounds"} for name, ledger in hosts.items()},
        devices=devices,
        dropped_by_device=dict(sorted(dropped.items())),
    )


def _host_ledgers(out: Path) -> dict[str, Any]:
    """The synthetic hosts' ledgers (fedge/simulate/synthetic.py), by host name."""
    return {path.stem: json.loads(path.read_text()) for path in sorted((out / "agents").glob("*.json"))}
