"""The arm64 check's run: install on a fresh arm64 tree, train against this machine's broker and aggregator, print JSON.

Every figure comes from one run on this machine (2 shared cores), so read the emulated numbers
as relative: qemu-user translates every arm64 instruction (training is 10-50x slower than on the
host) and its translation cache adds to each process's RSS. ``emulator_baseline`` measures that
overhead in the same run: an idle ``python3`` emulated and native.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
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
from bench.pi_arm64.emulation import FLOAT32_PROBE, FLOAT32_TOLERANCE, PI_CPUS, PiCpu, fake_cpu_tree, write_psutil_shim
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
    psutil_shim: bool = False  # emulation.PSUTIL_SHIM on the agents' PYTHONPATH: only revisions before 62188d5 need it
    pi: str = "4"  # the Raspberry Pi whose core qemu emulates (emulation.PI_CPUS)

    @property
    def cpu(self) -> PiCpu:
        return PI_CPUS[self.pi]

    def env(self) -> dict[str, str]:
        """The environment of every process in the tree (install, probes, agents)."""
        return {**TRUST_ENV, **self.cpu.env()}
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
    trainings_seen: int = 0  # processes seen under the agent: its training children (one a round) and what they start
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


def mounts(run_dir: Path, cache: Path, cpu: PiCpu = PI_CPUS["4"]) -> list[Mount]:
    """The standard mounts, the download caches (so a second run downloads nothing) and the Pi's CPU registers."""
    pip_cache, apt_cache = cache / "pip", cache / "apt-archives"
    (apt_cache / "partial").mkdir(parents=True, exist_ok=True)
    pip_cache.mkdir(parents=True, exist_ok=True)
    registers = fake_cpu_tree(run_dir / "emulated-sys-cpu", os.cpu_count() or 1, midr=cpu.midr)
    return [
        *userland.standard_mounts(),
        Mount("/sys/devices/system/cpu", str(registers)),
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
        except BaseException:  # the check interrupted (Ctrl-C): install.sh must not go on alone
            process.kill()
            await asyncio.shield(process.wait())
            raise
    return code, round(time.perf_counter() - started, 1)


async def emulator_baseline(root: Path, env: dict[str, str]) -> dict[str, float]:
    """RSS of an idle python3 under qemu against the host's own: the emulator's share of every RSS below."""
    script = "import time; time.sleep(4)"
    out: dict[str, float] = {}
    for name, argv in (("python3_idle_rss_mib_emulated", enter_command(root, ["python3", "-c", script], mounts=[], env=env)),
                       ("python3_idle_rss_mib_native", [sys._base_executable, "-I", "-c", script])):  # type: ignore[attr-defined]
        process = await asyncio.create_subprocess_exec(*argv)
        await asyncio.sleep(3)
        try:
            out[name] = round(_rss(psutil.Process(process.pid)) / MIB, 1)
        except psutil.Error:
            out[name] = 0.0
        await process.wait()
    return out


async def float32_error(root: Path, mounts_: list[Mount], env: dict[str, str], threads: int) -> float | str:
    """Largest error of float32 products in the tree's torch on ``threads`` threads against float64
    (emulation.FLOAT32_PROBE), or how the probe failed."""
    argv = enter_command(root, [f"{PREFIX}/venv/bin/python", "-c", FLOAT32_PROBE, str(threads)], mounts=mounts_, env=env)
    process = await asyncio.create_subprocess_exec(*argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
                                                   stderr=asyncio.subprocess.PIPE)
    out, err = await process.communicate()
    try:
        return float(out.decode().strip())
    except ValueError:
        return f"the probe exited {process.returncode}: {err.decode(errors='replace').strip()[-300:]}"


def float32_ok(probe: float | str) -> bool:
    return isinstance(probe, float) and probe <= FLOAT32_TOLERANCE


async def start_agent(root: Path, mounts_: list[Mount], index: int, agents: int, run_dir: Path, *, env: dict[str, str]) -> AgentRun:
    client_id = f"pi-{index}"
    # the installed config, as a user who runs a second agent on the same device would override it
    argv = [f"{PREFIX}/venv/bin/fedge", "agent", "--config", f"{PREFIX}/etc/agent.toml", "--client-id", client_id,
            "--state-dir", f"{PREFIX}/state-{index}", "--fleet", FLEET, "--task-opt", f"clients={agents}", "--exit-when-final",
            # This host's other programs (the other emulated agent, the aggregator) keep its 2 cores busy:
            # the `pi` preset's CPU condition would hold training back for reasons a real Pi would not have.
            "--policy", "always", "--log-level", "info"]
    log = run_dir / f"agent-{client_id}.log"
    out = log.open("ab")
    process = await asyncio.create_subprocess_exec(*enter_command(root, argv, mounts=mounts_, env=env),
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


@dataclass
class Observed:
    """What the fleet said over MQTT (the contract, not the aggregator's internals): receipts and statuses."""

    receipts: list[Any] = field(default_factory=list)  # fedge_contract.Receipt
    metrics: dict[int, dict[str, float]] = field(default_factory=dict)  # model version -> its evaluation
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    async def wait_for_version(self, version: int) -> None:
        while max(self.metrics, default=0) < version:
            self.changed.clear()
            await self.changed.wait()


async def observe(address: Any, client_ids: list[str], seen: Observed, subscribed: asyncio.Event) -> None:
    from fedge_contract import Receipt, RoundStatus, Topics
    from fedge_contract.mqtt import make_client

    topics = Topics(FLEET)
    async with make_client(address, "pi-check-results", persistent=False) as observer:
        await observer.subscribe(topics.status, qos=1)
        for client_id in client_ids:
            await observer.subscribe(topics.receipt(client_id), qos=1)
        subscribed.set()
        async for message in observer.messages:
            if not isinstance(message.payload, bytes) or not message.payload:
                continue
            if str(message.topic) == topics.status:
                status = RoundStatus.from_bytes(message.payload)
                if status.model_version > 0 and status.last_metrics:
                    seen.metrics[status.model_version] = dict(status.last_metrics)
            else:
                seen.receipts.append(Receipt.from_bytes(message.payload))
            seen.changed.set()


def aggregator_argv(options: Options, broker_url: str, run_dir: Path) -> list[str]:
    """This machine's aggregator, as an operator starts it: the ``fedge aggregator`` command and its flags."""
    return [sys.executable, "-m", "fedge", "aggregator", "--broker", broker_url, "--fleet", FLEET, "--task", "digits",
            "--task-opt", f"clients={options.agents}", "--rounds", str(options.rounds), "--target", str(options.agents),
            "--min", str(options.agents), "--deadline", str(int(options.train_timeout)), "--store", str(run_dir / "aggregator.sqlite"),
            "--log-file", str(run_dir / "aggregator.log")]


async def stop(process: asyncio.subprocess.Process, grace: float = 60) -> None:
    if process.returncode is None:
        process.terminate()
        try:
            async with asyncio.timeout(grace):
                await process.wait()
        except TimeoutError:
            process.kill()
            await process.wait()


async def train(options: Options, root: Path, mounts_: list[Mount], run_dir: Path, broker_url: str) -> dict[str, Any]:
    """The agents against ``fedge aggregator`` on this machine; per-agent memory, receipts, each model's accuracy, errors."""
    from fedge_contract import ReceiptStatus
    from fedge_contract.aio import Second, cancel_and_wait, race
    from fedge_contract.mqtt import BrokerAddress

    address = BrokerAddress.parse(broker_url)
    env = {**options.env(), "PYTHONPATH": SHIM} if options.psutil_shim else options.env()
    agents = [await start_agent(root, mounts_, i, options.agents, run_dir, env=env) for i in range(options.agents)]
    result: dict[str, Any] = {}
    seen, subscribed = Observed(), asyncio.Event()
    tasks: list[asyncio.Task[None]] = []
    aggregator: asyncio.subprocess.Process | None = None
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

        tasks.append(asyncio.create_task(sample(), name="rss-sampler"))
        tasks.append(asyncio.create_task(observe(address, [a.client_id for a in agents], seen, subscribed), name="results"))
        await subscribed.wait()
        started = time.perf_counter()
        aggregator = await asyncio.create_subprocess_exec(*aggregator_argv(options, broker_url, run_dir), stdin=asyncio.subprocess.DEVNULL)
        try:
            async with asyncio.timeout(options.train_timeout):
                agents_gone = asyncio.gather(*(a.process.wait() for a in agents))
                if isinstance(await race(aggregator.wait(), agents_gone), Second):
                    # --exit-when-final: the agents leave on the final model, while the aggregator still writes its last checkpoint
                    try:
                        async with asyncio.timeout(120):
                            await aggregator.wait()
                    except TimeoutError:
                        result["aggregator_did_not_exit"] = "the agents left; the aggregator was still running 120 s later"
                elif aggregator.returncode == 0:
                    for agent in agents:
                        await agent.process.wait()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(30):
                        await seen.wait_for_version(options.rounds)  # the final status (rounds_closed says if it never came)
        except TimeoutError:
            result["timed_out_after_s"] = options.train_timeout
        result["training_s"] = round(time.perf_counter() - started, 1)
    finally:
        if aggregator is not None:
            await stop(aggregator)
            result["aggregator_exit_code"] = aggregator.returncode
        await cancel_and_wait(tasks)
        for agent in agents:
            await stop(agent.process)
    result["aggregator_log"] = str(run_dir / "aggregator.log")
    result["rounds_closed"], result["rounds_expected"] = max(seen.metrics, default=0), options.rounds
    result["model_metrics"] = {f"v{version}": {k: round(v, 4) for k, v in m.items() if k in ("accuracy", "loss")}
                               for version, m in sorted(seen.metrics.items())}
    result["final_accuracy"] = seen.metrics[max(seen.metrics)].get("accuracy") if seen.metrics else None
    result["agents"] = [
        {"client_id": a.client_id, "exit_code": a.process.returncode, "idle_rss_mib": a.idle_rss_mib,
         "training_peak_rss_mib": round(a.peak_rss_mib, 1), "training_child_peak_rss_mib": round(a.peak_child_rss_mib, 1),
         "child_processes_seen": a.trainings_seen, "unknown_readings": unknown_readings(a.log), "log": str(a.log)}
        for a in agents
    ]
    result["updates_accepted"] = sum(1 for r in seen.receipts if r.status is ReceiptStatus.ACCEPTED)
    result["updates_expected"] = options.rounds * options.agents
    result["receipts_not_accepted"] = [{"round": r.round, "client_id": r.client_id, "status": r.status.value, "reason": r.reason}
                                       for r in seen.receipts if r.status is not ReceiptStatus.ACCEPTED]
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
    # the agent trains on one thread (install.sh's torch_threads = 1): that one must be right
    probe = (result.get("float32_max_error") or {}).get("threads_1")
    if probe is not None and not float32_ok(probe):
        errors.append(f"float32 products in the tree's torch on one thread: {probe} (tolerance {FLOAT32_TOLERANCE}); "
                      "its training is not to be trusted")
    if training.get("aggregator_exit_code", 0) != 0:
        errors.append(f"fedge aggregator exited {training['aggregator_exit_code']}: see {training.get('aggregator_log')}")
    errors.extend(training[key] for key in ("aggregator_did_not_exit",) if key in training)
    if training and training.get("rounds_closed") != training.get("rounds_expected"):
        errors.append(f"{training.get('rounds_closed')} of {training.get('rounds_expected')} rounds closed")
    if "timed_out_after_s" in training:
        errors.append(f"training did not finish in {training['timed_out_after_s']} s")
    if training and training.get("updates_accepted") != training.get("updates_expected"):
        errors.append(f"{training.get('updates_accepted')} of {training.get('updates_expected')} updates accepted")
    errors.extend(f"receipt: {r}" for r in training.get("receipts_not_accepted", []))
    return errors


def unknown_readings(log: Path, limit: int = 5) -> list[str]:
    """The agent's "cannot read the device's X (why)" warnings: readings it went on without (never an error)."""
    try:
        lines = log.read_text(errors="replace").splitlines()
    except OSError:
        return []
    return [line.split(" WARNING ", 1)[-1].strip() for line in lines if "cannot read the device's" in line][:limit]


def log_errors(log: Path, limit: int = 10) -> list[str]:
    """Lines of an agent's log that report a failure (tracebacks, ERROR records, signals)."""
    try:
        lines = log.read_text(errors="replace").splitlines()
    except OSError:
        return []
    markers = ("Traceback", " ERROR ", "ERROR:", "Segmentation fault", "SIGSEGV", "Fatal Python error", "killed by signal")
    return [line.strip() for line in lines if any(m in line for m in markers)][:limit]


def fresh_run_folders(run_dir: Path) -> tuple[Path, Path]:
    """Empty logs and broker folders for this run: (logs, broker). The broker's persistence must not
    outlive a run: the last run's retained "finished at v3" made the next run's agents leave at once
    (--exit-when-final) and its aggregator wait out its deadline for updates that never came."""
    folders = run_dir / "logs", run_dir / "broker"
    for folder in folders:
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
    return folders


async def run(options: Options) -> dict[str, Any]:
    from broker import LocalBroker

    cache = options.cache
    run_dir = cache / "run"
    result: dict[str, Any] = {"cache": str(cache), "agents_requested": options.agents, "rounds": options.rounds}
    started = time.perf_counter()
    base, built = userland.ensure_base(cache, cache / "debootstrap.log")
    result["userland"] = {"suite": userland.SUITE, "built_now": built, "seconds": round(time.perf_counter() - started, 1)}
    root = userland.fresh_copy(base, run_dir / "rootfs")
    logs, broker_dir = fresh_run_folders(run_dir)
    userland.copy_checkout(REPO, Path(str(root) + CHECKOUT), options.source)
    result["source"] = options.source or "working tree"
    mounts_ = mounts(run_dir, cache, options.cpu)
    result["emulated_cpu"] = {"board": options.cpu.board, "qemu_cpu": options.cpu.qemu_cpu, "midr_el1": options.cpu.midr}
    trust_host_certificates(root)
    result["psutil_shim"] = options.psutil_shim
    if options.psutil_shim:
        write_psutil_shim(Path(str(root) + SHIM))
    result["emulator_baseline"] = await emulator_baseline(root, options.env())
    async with LocalBroker(data_dir=broker_dir) as broker:
        # install.sh's default index (torch's CPU build) when this host reaches it, as on a Pi; else PyPI's (a CUDA build)
        cpu_index = prereqs.reachable(*prereqs.TORCH_CPU_INDEX)
        result["torch_index"] = "install.sh's default (CPU build)" if cpu_index else f"PyPI: {prereqs.TORCH_CPU_INDEX[0]} is unreachable from here"
        install = ["bash", f"{CHECKOUT}/deploy/pi/install.sh", "--no-systemd", *([] if cpu_index else ["--torch-index", ""]),
                   "--broker", broker.url, "--client-id", "pi-0"]
        result["install_command"] = " ".join(install)
        result["install_log"] = str(logs / "install.log")
        code, seconds = await run_logged(enter_command(root, install, mounts=mounts_, env=options.env(), cwd=CHECKOUT), logs / "install.log",
                                         options.install_timeout)
        result["install_exit_code"], result["install_seconds"] = code, seconds
        result["install_warnings"] = [line for line in (logs / "install.log").read_text(errors="replace").splitlines()
                                      if line.startswith("install.sh: warning")]
        venv = Path(str(root) + PREFIX) / "venv"
        if code == 0:
            result["installed"] = sizes.summary(venv)
            cores = os.cpu_count() or 1
            result["float32_max_error"] = {f"threads_{n}": await float32_error(root, mounts_, options.env(), n) for n in sorted({1, cores})}
            result["warnings"] = [f"float32 products on {name.split('_')[1]} threads: {probe}" for name, probe in result["float32_max_error"].items()
                                  if not float32_ok(probe)]
            result["training"] = await train(options, root, mounts_, logs, broker.url)
    # what the next run will not download again (pip caches only what the index lets it cache)
    result["download_cache_mib"] = {name: round(sizes.tree_bytes(cache / name) / MIB, 1) for name in ("pip", "apt-archives")}
    result["errors"] = errors_in(result)
    result["workarounds"] = [
        (f"emulation: every arm64 process runs as the Pi's core (QEMU_CPU={options.cpu.qemu_cpu}): with qemu's default CPU, "
         "whose SVE vectors are 512 bits, torch's float32 products are wrong (bench/pi_arm64/emulation.py)"),
        "emulation: /sys/devices/system/cpu inside the tree is a Pi 4's (midr_el1): torch's cpuinfo crashes without it (bench/pi_arm64/emulation.py)",
        *([("emulation (--psutil-shim, for revisions before 62188d5): a sitecustomize on the agents' PYTHONPATH turns off psutil's "
            "PID-reuse check, which qemu-user's per-thread start times in /proc/self/stat trip")] if options.psutil_shim else []),
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
    parser.add_argument("--pi", choices=sorted(PI_CPUS), default="4",
                        help="the Raspberry Pi whose core qemu emulates: 4 (Cortex-A72, the default) or 5 (Cortex-A76)")
    parser.add_argument("--psutil-shim", action="store_true",
                        help="turn psutil's PID-reuse check off in the emulated agents: needed only with --source REV before 62188d5, "
                             "whose agent died of qemu-user's per-thread start times")
    parser.add_argument("--source", metavar="REV", help="install this git revision of fedge instead of the working tree "
                                                        "(the check itself stays this one): to measure an earlier version")
    args = parser.parse_args(argv)
    if sys.platform == "linux" and os.geteuid() == 0:
        prereqs.enable_binfmt()
    reasons = prereqs.missing()
    if reasons:
        print(json.dumps({"skipped": "; ".join(reasons), "needs": prereqs.NEEDS}, indent=2))
        return 0
    result = asyncio.run(run(Options(cache=args.cache.resolve(), agents=args.agents, rounds=args.rounds, source=args.source,
                                     psutil_shim=args.psutil_shim, pi=args.pi)))
    print(json.dumps(result, indent=2))
    return 1 if result["errors"] else 0
