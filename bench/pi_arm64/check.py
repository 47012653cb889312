"""The arm64 check's run: install on a fresh arm64 tree, train against this machine's broker and aggregator, print JSON.

Every figure comes from one run on this machine (2 shared cores), so read the emulated numbers
as relative: qemu-user translates every arm64 instruction (training is 10-50x slower than on the
host) and its translation cache adds to each process's RSS. ``emulator_baseline`` measures that
overhead in the same run: an idle ``python3`` emulated and native.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from bench.pi_arm64 import prereqs, sizes, userland
from bench.pi_arm64.emulation import fake_cpu_tree, write_psutil_shim
from bench.pi_arm64.userland import Mount, enter_command

REPO = Path(__file__).resolve().parents[2]
FLEET = "pi-check"
CHECKOUT = "/home/pi/fedge"  # where a Pi user's clone of the repository would be
PREFIX = "/opt/fedge"  # install.sh's default, as `sudo ./install.sh` uses it
MIB = 2**20
SHIM = "/opt/fedge-pi-check/shim"  # emulation-only sitecustomize (emulation.PSUTIL_SHIM), outside the install


@dataclass(frozen=True)
class Options:
    cache: Path
    agents: int = 2
    rounds: int = 3
    source: str | None = None  # a git revision to install instead of the working tree
    install_timeout: float = 3600.0
    train_timeout: float = 3600.0


@dataclass
class AgentRun:
    """One arm64 agent: its process (seen from the host) and what was measured of it."""

    client_id: str
    process: asyncio.subprocess.Process
    log: Path
    idle_rss_mib: float | None = None
    peak_rss_mib: float = 0.0  # the agent and its training child together, sampled while rounds run
    peak_child_rss_mib: float = 0.0
    trainings_seen: int = 0  # training children observed (one per round)
    _children: set[int] = field(default_factory=set)

    def sample(self) -> None:
        try:
            me = psutil.Process(self.process.pid)
            children = me.children(recursive=True)
        except psutil.Error:
            return
        total = _rss(me)
        for child in children:
            rss = _rss(child)
            total += rss
            self.peak_child_rss_mib = max(self.peak_child_rss_mib, rss / MIB)
            if child.pid not in self._children:
                self._children.add(child.pid)
                self.trainings_seen += 1
        self.peak_rss_mib = max(self.peak_rss_mib, total / MIB)

    def rss_mib(self) -> float:
        try:
            me = psutil.Process(self.process.pid)
            return (_rss(me) + sum(_rss(c) for c in me.children(recursive=True))) / MIB
        except psutil.Error:
            return 0.0


def _rss(process: psutil.Process) -> int:
    try:
        return int(process.memory_info().rss)
    except psutil.Error:
        return 0


def mounts(run_dir: Path, cache: Path) -> list[Mount]:
    """The standard mounts, the download caches (so a second run downloads nothing) and the emulation shim."""
    pip_cache, apt_cache = cache / "pip", cache / "apt-archives"
    (apt_cache / "partial").mkdir(parents=True, exist_ok=True)
    pip_cache.mkdir(parents=True, exist_ok=True)
    cpu = fake_cpu_tree(run_dir / "emulated-sys-cpu", os.cpu_count() or 1)
    return [
        *userland.standard_mounts(),
        Mount("/sys/devices/system/cpu", str(cpu)),
        Mount("/root/.cache/pip", str(pip_cache)),
        Mount("/var/cache/apt/archives", str(apt_cache)),
    ]


HOST_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
# pip 23 (bookworm's, inside the new venv) trusts certifi's bundle unless told otherwise
TRUST_ENV = {"PIP_CERT": str(HOST_BUNDLE)}


def trust_host_certificates(root: Path) -> None:
    """The tree trusts what this host trusts: a host whose HTTPS goes through an inspecting proxy
    has that proxy's CA only in its own bundle, and pip inside the tree would fail every download."""
    if HOST_BUNDLE.exists():
        shutil.copyfile(HOST_BUNDLE, Path(str(root) + str(HOST_BUNDLE)))


async def run_logged(argv: list[str], log: Path, timeout: float) -> tuple[int, float]:
    """Run to completion with its output in ``log``; (exit code, seconds). A timeout kills it and counts as 124."""
    started = time.perf_counter()
    with log.open("ab") as out:
        process = await asyncio.create_subprocess_exec(*argv, stdin=asyncio.subprocess.DEVNULL, stdout=out, stderr=out)
        try:
            async with asyncio.timeout(timeout):
                code = await process.wait()
        except TimeoutError:
            process.kill()
            await process.wait()
            code = 124
    return code, round(time.perf_counter() - started, 1)


async def emulator_baseline(root: Path, run_dir: Path) -> dict[str, float]:
    """RSS of an idle python3 under qemu against the host's own: the emulator's share of every RSS below."""
    script = "import time; time.sleep(4)"
    out: dict[str, float] = {}
    for name, argv in (("python3_idle_rss_mib_emulated", enter_command(root, ["python3", "-c", script], mounts=[])),
                       ("python3_idle_rss_mib_native", [sys._base_executable, "-I", "-c", script])):  # type: ignore[attr-defined]
        process = await asyncio.create_subprocess_exec(*argv)
        await asyncio.sleep(3)
        try:
            out[name] = round(_rss(psutil.Process(process.pid)) / MIB, 1)
        except psutil.Error:
            out[name] = 0.0
        await process.wait()
    return out


async def start_agent(root: Path, mounts_: list[Mount], index: int, agents: int, run_dir: Path) -> AgentRun:
    client_id = f"pi-{index}"
    # the installed config, as a user who runs a second agent on the same device would override it
    argv = [f"{PREFIX}/venv/bin/fedge", "agent", "--config", f"{PREFIX}/etc/agent.toml", "--client-id", client_id,
            "--state-dir", f"{PREFIX}/state-{index}", "--fleet", FLEET, "--task-opt", f"clients={agents}", "--exit-when-final",
            # This host's other programs (the other emulated agent, the aggregator) keep its 2 cores busy:
            # the `pi` preset's CPU condition would hold training back for reasons a real Pi would not have.
            "--policy", "always", "--log-level", "info"]
    log = run_dir / f"agent-{client_id}.log"
    out = log.open("ab")
    process = await asyncio.create_subprocess_exec(*enter_command(root, argv, mounts=mounts_, env={**TRUST_ENV, "PYTHONPATH": SHIM}),
                                                   stdin=asyncio.subprocess.DEVNULL, stdout=out, stderr=out)
    out.close()
    return AgentRun(client_id, process, log)


async def wait_online(address: Any, client_ids: list[str], timeout: float) -> None:
    from fedge_contract import Presence, Topics
    from fedge_contract.mqtt import make_client

    topics = Topics(FLEET)
    waiting = set(client_ids)
    async with asyncio.timeout(timeout), make_client(address, "pi-check-observer", persistent=False) as observer:
        for client_id in client_ids:
            await observer.subscribe(topics.presence(client_id), qos=1)
        async for message in observer.messages:
            if isinstance(message.payload, bytes) and message.payload:
                presence = Presence.from_bytes(message.payload)
                if presence.state == "online":
                    waiting.discard(presence.client_id)
            if not waiting:
                return


async def train(options: Options, root: Path, mounts_: list[Mount], run_dir: Path, broker_url: str) -> dict[str, Any]:
    """The agents against an aggregator in this process; per-agent memory, receipts and errors."""
    from aggregator import Aggregator, config_of
    from aggregator.store import Store
    from fedge_contract.aio import cancel_and_wait
    from fedge_contract.mqtt import BrokerAddress

    address = BrokerAddress.parse(broker_url)
    agents = [await start_agent(root, mounts_, i, options.agents, run_dir) for i in range(options.agents)]
    result: dict[str, Any] = {}
    sampler: asyncio.Task[None] | None = None
    try:
        started = time.perf_counter()
        await wait_online(address, [a.client_id for a in agents], timeout=900)
        result["agents_online_s"] = round(time.perf_counter() - started, 1)
        await asyncio.sleep(5)  # let start-up allocations settle: the idle figure is a waiting agent's
        for agent in agents:
            agent.idle_rss_mib = round(agent.rss_mib(), 1)

        async def sample() -> None:
            while True:
                for agent in agents:
                    agent.sample()
                await asyncio.sleep(0.1)

        sampler = asyncio.create_task(sample(), name="rss-sampler")
        config = config_of(
            address, fleet=FLEET, task="digits", task_options={"clients": str(options.agents)}, rounds=options.rounds,
            target=options.agents, min_updates=options.agents, deadline=options.train_timeout, store=run_dir / "aggregator.sqlite",
        )
        started = time.perf_counter()
        try:
            async with asyncio.timeout(options.train_timeout):
                await Aggregator(config).run()
                for agent in agents:
                    await agent.process.wait()  # --exit-when-final: each exits on the final model
        except TimeoutError:
            result["timed_out_after_s"] = options.train_timeout
        result["training_s"] = round(time.perf_counter() - started, 1)
    finally:
        if sampler is not None:
            await cancel_and_wait([sampler])
        for agent in agents:
            if agent.process.returncode is None:
                agent.process.terminate()
                try:
                    async with asyncio.timeout(60):
                        await agent.process.wait()
                except TimeoutError:
                    agent.process.kill()
                    await agent.process.wait()
    receipts: list[dict[str, Any]] = []
    if (run_dir / "aggregator.sqlite").exists():
        with Store(run_dir / "aggregator.sqlite") as ledger:
            receipts = ledger.receipts()
            rounds = ledger.rounds()
        result["rounds_closed"] = sum(1 for r in rounds if r["closed"])
        result["final_accuracy"] = next((r["metrics"].get("accuracy") for r in reversed(rounds) if r["metrics"]), None)
    result["agents"] = [
        {"client_id": a.client_id, "exit_code": a.process.returncode, "idle_rss_mib": a.idle_rss_mib,
         "training_peak_rss_mib": round(a.peak_rss_mib, 1), "training_child_peak_rss_mib": round(a.peak_child_rss_mib, 1),
         "child_processes_seen": a.trainings_seen, "log": str(a.log)}
        for a in agents
    ]
    result["updates_accepted"] = sum(1 for r in receipts if r["status"] == "accepted")
    result["updates_expected"] = options.rounds * options.agents
    result["receipts_not_accepted"] = [{k: r[k] for k in ("round", "client_id", "status", "reason")} for r in receipts if r["status"] != "accepted"]
    return result


def errors_in(result: dict[str, Any]) -> list[str]:
    """What went wrong in a run, from its figures and the agents' logs (empty: nothing)."""
    errors: list[str] = []
    if result.get("install_exit_code", 0) != 0:
        errors.append(f"install.sh exited {result['install_exit_code']}: see {result.get('install_log')}")
    training = result.get("training") or {}
    for agent in training.get("agents", []):
        if agent["exit_code"] != 0:
            errors.append(f"{agent['client_id']} exited {agent['exit_code']}")
        errors.extend(f"{agent['client_id']}: {line}" for line in log_errors(Path(agent["log"])))
    if training and training.get("updates_accepted") != training.get("updates_expected"):
        errors.append(f"{training.get('updates_accepted')} of {training.get('updates_expected')} updates accepted")
    errors.extend(f"receipt: {r}" for r in training.get("receipts_not_accepted", []))
    return errors


def log_errors(log: Path, limit: int = 10) -> list[str]:
    """Lines of an agent's log that report a failure (tracebacks, ERROR records, signals)."""
    try:
        lines = log.read_text(errors="replace").splitlines()
    except OSError:
        return []
    markers = ("Traceback", " ERROR ", "ERROR:", "Segmentation fault", "SIGSEGV", "Fatal Python error", "killed by signal")
    return [line.strip() for line in lines if any(m in line for m in markers)][:limit]


async def run(options: Options) -> dict[str, Any]:
    from broker import LocalBroker

    cache = options.cache
    run_dir = cache / "run"
    logs = run_dir / "logs"
    result: dict[str, Any] = {"cache": str(cache), "agents_requested": options.agents, "rounds": options.rounds}
    started = time.perf_counter()
    base, built = userland.ensure_base(cache, cache / "debootstrap.log")
    result["userland"] = {"suite": userland.SUITE, "built_now": built, "seconds": round(time.perf_counter() - started, 1)}
    root = userland.fresh_copy(base, run_dir / "rootfs")
    shutil.rmtree(logs, ignore_errors=True)
    logs.mkdir(parents=True)
    userland.copy_checkout(REPO, Path(str(root) + CHECKOUT), options.source)
    result["source"] = options.source or "working tree"
    mounts_ = mounts(run_dir, cache)
    trust_host_certificates(root)
    write_psutil_shim(Path(str(root) + SHIM))
    result["emulator_baseline"] = await emulator_baseline(root, run_dir)
    async with LocalBroker(data_dir=run_dir / "broker") as broker:
        install = ["bash", f"{CHECKOUT}/deploy/pi/install.sh", "--no-systemd", "--torch-index", "",
                   "--broker", broker.url, "--client-id", "pi-0"]
        result["install_command"] = " ".join(install)
        result["install_log"] = str(logs / "install.log")
        code, seconds = await run_logged(enter_command(root, install, mounts=mounts_, env=TRUST_ENV, cwd=CHECKOUT), logs / "install.log",
                                         options.install_timeout)
        result["install_exit_code"], result["install_seconds"] = code, seconds
        result["install_warnings"] = [line for line in (logs / "install.log").read_text(errors="replace").splitlines()
                                      if line.startswith("install.sh: warning")]
        venv = Path(str(root) + PREFIX) / "venv"
        if code == 0:
            result["installed"] = sizes.summary(venv)
            result["training"] = await train(options, root, mounts_, logs, broker.url)
    # what the next run will not download again (pip caches only what the index lets it cache)
    result["download_cache_mib"] = {name: round(sizes.tree_bytes(cache / name) / MIB, 1) for name in ("pip", "apt-archives")}
    result["errors"] = errors_in(result)
    result["workarounds"] = [
        "emulation: /sys/devices/system/cpu inside the tree is a Pi 4's (midr_el1): torch's cpuinfo crashes without it (bench/pi_arm64/emulation.py)",
        ("emulation: a sitecustomize on the agents' PYTHONPATH turns off psutil's PID-reuse check, which qemu-user's per-thread "
         "start times in /proc/self/stat trip (the agent's CPU probe raised NoSuchProcess)"),
        "host: the tree trusts this host's CA bundle (PIP_CERT): its HTTPS may go through an inspecting proxy",
        "host: --policy always, because this 2-core host's other programs (the other emulated agent) would fail the pi preset's CPU condition",
    ]
    return result


def default_cache() -> Path:
    explicit = os.environ.get("FEDGE_PI_CHECK_CACHE")
    if explicit:
        return Path(explicit)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "fedge-pi-check"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.pi_arm64", description=__doc__)
    parser.add_argument("--agents", type=int, choices=[1, 2], default=2, help="arm64 agents to run (default 2)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds to train (default 3)")
    parser.add_argument("--cache", type=Path, default=default_cache(),
                        help="the cached arm64 tree, downloads and the last run (default $FEDGE_PI_CHECK_CACHE or ~/.cache/fedge-pi-check)")
    parser.add_argument("--source", metavar="REV", help="install this git revision of fedge instead of the working tree "
                                                        "(the check itself stays this one): to measure an earlier version")
    args = parser.parse_args(argv)
    if sys.platform == "linux" and os.geteuid() == 0:
        prereqs.enable_binfmt()
    reasons = prereqs.missing()
    if reasons:
        print(json.dumps({"skipped": "; ".join(reasons), "needs": prereqs.NEEDS}, indent=2))
        return 0
    result = asyncio.run(run(Options(cache=args.cache.resolve(), agents=args.agents, rounds=args.rounds, source=args.source)))
    print(json.dumps(result, indent=2))
    return 1 if result["errors"] else 0
