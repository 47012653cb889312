"""Issue 17's benchmark, end to end: ``fedge aggregator --secure-aggregation`` against plain FedAvg, on digits.

For each cohort size (``--clients``, default 20 and 100) and dropout rate (``--dropout``, default 0, 0.1,
0.3), two runs of ``--rounds`` (30) synchronous rounds from the same initial model, each with the real
aggregator (``python -m fedge aggregator``, its own process, on a local Mosquitto) and real agents
(edge_agent.Agent, hosted in this process as ``fedge simulate`` hosts them: one shared task, one
training thread, each agent its own MQTT connection and state folder):

- ``plain``: ``--codec none`` (the float32 Update a masked vector compares with);
- ``secure``: ``--secure-aggregation``; every agent runs its secure-aggregation module.

Dropouts: each round a seeded ``dropout`` share of the devices is lost mid-protocol, half right after
sending their sealed shares (they count in no sum; their mask keys are rebuilt), half right after
their masked input (they count; they never answer the unmask request). A lost device publishes
nothing more in that session and takes part again in the next round (or in a retry of the round).
The plain run loses the same devices: the first half's Updates never leave them, the second half's
count; its target is what remains, so a plain round closes the moment the last live Update arrives
(the fastest a plain round can close), and both runs average the same devices: the accuracy gap is
the fixed point's alone. A secure round with losses waits for the mask and unmask phases'
deadlines, since a lost device is only known lost at a deadline: ``--mask-timeout`` (default: 3x the
slowest plain round of the same size, which includes the training of every device on this host's one
training thread, and at least 8 s) and ``--unmask-timeout``.

Reported per run: held-out accuracy after the last round (the aggregator's evaluation), seconds per
round (from the round's opening to its model's commit, training included: mean, max), bytes per
device per round (secure: everything the device's protocol module sent and received; plain: its
Update; the global model's download is the same for both and left out; mean over the devices not
lost in that round), the inputs summed per round, the aggregator process's CPU seconds per round (from the first round's
opening to the final model),
and for secure runs the sessions abandoned, the crypto's CPU seconds per device per round (thread time
inside the module: keys, Shamir, sealing, fixed-point encoding, masking, reveals) and the relay's CPU
seconds per round. One machine, shared: compare the two runs of one size and dropout, not absolute
figures; the load average is printed.

Prints JSON. Run: nice -n 5 python -m bench.secagg [--quick] [--clients 20,100] [--rounds 30] [--dropout 0,0.1,0.3]
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import contextlib
import json
import logging
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import psutil

from aggregator.store import Store
from bench.secagg_fixedpoint import _alpha
from broker import LocalBroker
from edge_agent import Agent, AgentConfig
from fedge_contract import RoundState, RoundStatus, Topics, Update
from fedge_contract.mqtt import BrokerAddress, Connection
from fedge_contract.secagg import DeviceMessage, MaskedInput, Shares
from tests.integration.secure_agents import RecordingSecure

MAX_MODEL = 1 << 24


def lost_in(ids: Sequence[str], dropout: float, round_no: int, seed: int) -> tuple[set[str], set[str]]:
    """(lost after their shares, lost after their masked input) in ``round_no``: seeded, the same for both runs."""
    lost = list(np.random.default_rng([seed, round_no]).permutation(sorted(ids))[: round(dropout * len(ids))])
    return set(lost[: len(lost) // 2]), set(lost[len(lost) // 2 :])


class PlainAgent(Agent):
    """An agent whose Update never leaves it in the rounds it is lost in (before its input: as a secure device lost after its shares)."""

    silent_rounds: frozenset[int] = frozenset()

    async def _publish_update(self, update_id: str, payload: bytes) -> None:
        if Update.from_bytes(payload, max_bytes=MAX_MODEL).round in self.silent_rounds:
            return
        await super()._publish_update(update_id, payload)


def _agents(address: BrokerAddress, fleet: str, ids: list[str], state: Path, task_options: dict[str, str], secure: bool,
            plan: dict[int, tuple[set[str], set[str]]], executor: concurrent.futures.Executor) -> list[Agent]:
    from fedge_tasks import load_task

    task = load_task("digits", task_options)  # one task object for every agent: the data is loaded once
    agents: list[Agent] = []
    for client in ids:
        config = AgentConfig(broker=address, client_id=client, state_dir=state / client, fleet=fleet, task="digits",
                             task_options=task_options, exit_when_final=True, isolate_training=False, train_nice=0)
        if secure:
            agent = Agent(config, task=task, executor=executor)
            lose: dict[int, type[DeviceMessage]] = {r: Shares for r, (before, _) in plan.items() if client in before}
            lose.update({r: MaskedInput for r, (_, after) in plan.items() if client in after})
            agent._secure = RecordingSecure(lose=lose, record=False, fleet=fleet, client_id=client, state_dir=config.state_dir,
                                            max_message_bytes=config.max_message_bytes, on_change=agent._presence_if_connected)
        else:
            agent = PlainAgent(config, task=task, executor=executor)
            agent.silent_rounds = frozenset(r for r, (before, _) in plan.items() if client in before)
        agents.append(agent)
    return agents


def _counters(agents: list[Agent], secure: bool) -> dict[str, tuple[int, float]]:
    """Each agent's (bytes, crypto CPU seconds) so far."""
    out = {}
    for agent in agents:
        if secure:
            module = agent._secure
            assert isinstance(module, RecordingSecure)
            out[agent.config.client_id] = (module.stats.bytes_up + module.stats.bytes_down, module.stats.crypto_seconds)
        else:
            out[agent.config.client_id] = (agent.stats.bytes_up, 0.0)
    return out


@contextlib.asynccontextmanager
async def _watching(address: BrokerAddress, fleet: str, agents: list[Agent], secure: bool,
                    aggregator: psutil.Process) -> AsyncIterator[dict[int, dict[str, tuple[int, float]]]]:
    """The agents' counters at each round's opening (and at the end, as round ``rounds + 1``), with the
    aggregator process's CPU seconds so far under the key ``""``."""
    topics = Topics(fleet)
    seen: dict[int, dict[str, tuple[int, float]]] = {}

    def cpu() -> float:
        with contextlib.suppress(psutil.Error):
            times = aggregator.cpu_times()
            return float(times.user + times.system)
        return math.nan

    async def watch(conn: Connection) -> None:
        while True:
            message = await conn.messages.get()
            if not isinstance(message.payload, bytes) or not message.payload:
                continue
            status = RoundStatus.from_bytes(message.payload)
            number = status.round + 1 if status.state is RoundState.FINISHED else status.round
            if status.state is not RoundState.AGGREGATING and number not in seen:
                seen[number] = {**_counters(agents, secure), "": (0, cpu())}

    async with Connection(address, f"bench-watch-{fleet}"[:64], subscriptions=[topics.status], persistent=False) as conn:
        task = asyncio.create_task(watch(conn))
        try:
            yield seen
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


async def run(url: str, clients: int, rounds: int, dropout: float, mode: str, timeouts: dict[str, float],
              seed: int = 0) -> dict[str, Any]:
    address = BrokerAddress.parse(url)
    secure = mode == "secure"
    fleet = f"bench-{mode}-{clients}-{round(dropout * 100)}"
    ids = [f"agent-{i}" for i in range(clients)]
    plan = {r: lost_in(ids, dropout, r, seed) for r in range(1, rounds + 1)}
    before = len(plan[1][0])
    task_options = {"clients": str(clients), "alpha": str(_alpha(clients)), "seed": str(seed), "init_seed": str(seed)}
    with tempfile.TemporaryDirectory() as folder:
        store = Path(folder) / "aggregator.sqlite"
        argv = [sys.executable, "-m", "fedge", "aggregator", f"--broker={url}", f"--fleet={fleet}", "--task=digits",
                *(f"--task-opt={k}={v}" for k, v in task_options.items()), f"--rounds={rounds}", "--min=1", f"--store={store}",
                "--codec=none", "--log-level=warning"]
        if secure:
            argv += [f"--target={clients}", "--deadline=120", "--secure-aggregation", "--secagg-advertise-timeout=30",
                     "--secagg-share-timeout=30", f"--secagg-mask-timeout={timeouts['mask']}", f"--secagg-unmask-timeout={timeouts['unmask']}"]
        else:
            argv += [f"--target={clients - before}", "--deadline=120"]
        executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="train")
        agents = _agents(address, fleet, ids, Path(folder) / "agents", task_options, secure, plan, executor)
        process = await asyncio.create_subprocess_exec(*argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
                                                       stderr=asyncio.subprocess.PIPE)
        try:
            async with _watching(address, fleet, agents, secure, psutil.Process(process.pid)) as seen:
                async with asyncio.timeout(rounds * 600):
                    tasks = [asyncio.create_task(agent.run()) for agent in agents]
                    await asyncio.gather(*tasks)  # the agents exit on the final model
                    await process.wait()
            if process.returncode != 0:
                err = (await process.stderr.read()).decode(errors="replace") if process.stderr else ""
                raise RuntimeError(f"the aggregator exited with {process.returncode}: {err[-2000:]}")
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()
            executor.shutdown(wait=False, cancel_futures=True)
        with Store(store, readonly=True) as db:
            closed = db.rounds()
    seconds = [r["closed"] - r["opened"] for r in closed]
    per_round_bytes, per_round_crypto = [], []
    for r in range(1, rounds + 1):
        gone = plan[r][0] | plan[r][1]
        live = [c for c in ids if c not in gone]
        start, end = seen[r], seen[r + 1]
        per_round_bytes.append(statistics.mean(end[c][0] - start[c][0] for c in live))
        per_round_crypto.append(statistics.mean(end[c][1] - start[c][1] for c in live))
    metrics = [r["metrics"] for r in closed]
    result: dict[str, Any] = {
        "clients": clients, "alpha": float(task_options["alpha"]), "mode": mode, "dropout": dropout, "rounds": rounds,
        "accuracy": round(metrics[-1]["accuracy"], 4),
        "seconds_per_round": {"mean": round(statistics.mean(seconds), 3), "max": round(max(seconds), 3)},
        "bytes_per_device_per_round": round(statistics.mean(per_round_bytes)),
        "inputs_per_round": round(statistics.mean(r["accepted"] for r in closed), 1),
        # from the first round's opening to the final model (start-up and the initial model's evaluation left out)
        "aggregator_cpu_seconds_per_round": round((seen[rounds + 1][""][1] - seen[1][""][1]) / rounds, 4),
    }
    if secure:
        result.update({
            "abandoned_and_retried": int(sum(m["secure_abandoned"] for m in metrics)),
            "crypto_cpu_seconds_per_device_per_round": round(statistics.mean(per_round_crypto), 5),
            "relay_cpu_seconds_per_round": round(statistics.mean(m["secure_relay_cpu_seconds"] for m in metrics), 4),
        })
    return result


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    clients = [20] if args.quick else [int(c) for c in args.clients.split(",")]
    dropouts = [0.0, 0.3] if args.quick else [float(d) for d in args.dropout.split(",")]
    rounds = 3 if args.quick else args.rounds
    runs = []
    load_before = os.getloadavg()
    started = time.monotonic()
    with tempfile.TemporaryDirectory() as folder:
        async with LocalBroker(data_dir=Path(folder)) as broker:
            for n in clients:
                for dropout in dropouts:
                    plain = await run(broker.url, n, rounds, dropout, "plain", {})
                    mask = args.mask_timeout or max(8.0, math.ceil(3 * plain["seconds_per_round"]["max"]))
                    secure = await run(broker.url, n, rounds, dropout, "secure", {"mask": mask, "unmask": args.unmask_timeout})
                    runs.append({
                        "clients": n, "dropout": dropout, "mask_timeout": mask, "plain": plain, "secure": secure,
                        "accuracy_gap_points": round(100 * (secure["accuracy"] - plain["accuracy"]), 2),
                        "bytes_ratio": round(secure["bytes_per_device_per_round"] / plain["bytes_per_device_per_round"], 3),
                        "seconds_ratio": round(secure["seconds_per_round"]["mean"] / plain["seconds_per_round"]["mean"], 2),
                    })
                    print(json.dumps(runs[-1]), flush=True, file=sys.stderr)  # progress: a full run takes a while
    return {
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count(), "nice": os.nice(0),
                    "load_average_before": [round(x, 2) for x in load_before], "load_average_after": [round(x, 2) for x in os.getloadavg()],
                    "wall_seconds": round(time.monotonic() - started)},
        "unmask_timeout": args.unmask_timeout, "runs": runs,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", default="20,100")
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--dropout", default="0,0.1,0.3")
    parser.add_argument("--mask-timeout", type=float, help="secure runs' mask phase deadline (default: 3x the slowest plain round)")
    parser.add_argument("--unmask-timeout", type=float, default=3.0)
    parser.add_argument("--quick", action="store_true", help="20 clients, 3 rounds, dropout 0 and 0.3")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    print(json.dumps(asyncio.run(main_async(args)), indent=2))


if __name__ == "__main__":
    main()
