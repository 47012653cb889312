"""Issue 15's benchmark: who trains, who wastes, who evaluates. Prints JSON.

The parts, compared inside one invocation on this machine:

- ``fanout``: one announcement (nobody invited) to 10,000 synthetic devices with a connection
  each, on a real Mosquitto and no aggregator: connect time, first and last arrival, memory.

- ``fleet`` (a ``fedge simulate`` run, as the rest): 10,000 synthetic devices (one MQTT connection each, a few host processes), target
  200, 10 rounds. Per round: seconds, devices that trained, wasted updates (trained but never
  folded: stale, not invited, superseded), bytes of the selection in the announcement; the
  aggregator's, broker's and hosts' peak memory, the connect time, and the fan-out of each
  announcement to every device (first to last arrival). Arms: ``everyone`` (no selection, today's
  rounds) and ``cohort`` (``--over-select 1.3``).
- ``training``: digits, 100 devices (Dirichlet 0.5; ``min_samples=5``, the only way digits splits
  100 ways at 0.5), target 20, 30 rounds: accuracy after 30 rounds, rounds to 0.90 and
  device-seconds of training, ``everyone`` against ``cohort``.
- ``in_process``: the same comparison in one process, with the agents' trainer, the selection
  rule and FedAvg, both arms: what the wired aggregator should reach.
- each ``training`` arm runs with ``--eval-every 1 --eval-fraction F``: its ``federated_eval`` is the
  aggregator's own federated accuracy of every round's model against its server-side accuracy.
- ``federated_eval``: for every model version of the ``everyone`` training run, the server's
  held-out accuracy against the federated accuracy the devices asked by the hash rule
  (``--eval-fraction``) report on their own held-out splits (computed here with the agents' own
  evaluation, which is deterministic), and their difference.

An arm whose aggregator does not take ``--over-select`` yet says so instead of a figure. ``everyone``
passes ``--over-select 0`` (cohorts are on by default since they exist).

    python -m bench.participation [--part fleet|training|federated_eval|all] [--agents 10000] [--rounds 10]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

FLEET = "sim"  # fedge simulate's fleet name


def aggregator_selects() -> bool:
    """Whether this tree's aggregator takes --over-select (cohort selection wired in)."""
    out = subprocess.run([sys.executable, "-m", "fedge", "aggregator", "--help"], capture_output=True, text=True, check=False)
    return "--over-select" in out.stdout


def simulate(out: Path, *args: str, timeout: float) -> tuple[dict[str, Any], float]:
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "fedge", "simulate", f"--out={out}", "--quiet", *args],
                          capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=timeout, check=False)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"fedge simulate {' '.join(args)} failed ({done.returncode}): {done.stderr.strip()[-1500:]}")
    return json.loads((out / "report.json").read_text()), wall


# ---------------------------------------------------------------------- fleet (synthetic)


def fleet_arm(agents: int, target: int, rounds: int, params: int, over_select: float | None, tmp: Path) -> dict[str, Any]:
    name = "cohort" if over_select else "everyone"
    args = [f"--agents={agents}", f"--target={target}", f"--rounds={rounds}", "--synthetic", f"--params={params}",
            "--downloads=all", "--deadline=120", f"--over-select={over_select or 0}"]
    report, wall = simulate(tmp / name, *args, timeout=3600)
    ledgers = [json.loads(p.read_text()) for p in sorted((tmp / name / "agents").glob("*.json"))]
    per_round = []
    for row in report["rounds"]:
        counts = [ledger["rounds"].get(str(row["round"]), {}) for ledger in ledgers]
        total = {key: sum(c.get(key, 0) for c in counts) for key in ("trained", "updates", "accepted", "stale", "uninvited")}
        firsts = [c["model_first"] for c in counts if c.get("model_first")]
        lasts = [c["model_last"] for c in counts if c.get("model_last")]
        per_round.append({
            "round": row["round"], "seconds": round(row["seconds"], 2), "trained": int(total["trained"]),
            "published": int(total["updates"]), "accepted": row["participants"],
            "wasted": int(total["trained"]) - row["participants"], "stale_receipts": int(total["stale"]),
            "uninvited_receipts": int(total["uninvited"]), "selection_bytes": row.get("selection_bytes", 0),
            "announcement_fanout_seconds": round(max(lasts) - min(firsts), 2) if firsts and lasts else None,
            "bytes_down": row["bytes_down"],
        })
    steady = per_round[1:] or per_round
    peaks = report["peak_rss_mib"]
    return {
        "arm": name, "agents": agents, "target": target, "over_select": over_select, "params": params, "wall_seconds": round(wall, 1),
        "seconds_per_round": round(statistics.mean(r["seconds"] for r in steady), 2),
        "trained_per_round": statistics.mean(r["trained"] for r in steady),
        "wasted_per_round": statistics.mean(r["wasted"] for r in steady),
        "selection_bytes_per_round": statistics.mean(r["selection_bytes"] for r in steady),
        "goal": {"trained_per_round_max": math.ceil(1.3 * target), "wasted_per_round_max": 0.3 * target},
        "peak_rss_mib": {"aggregator": round(peaks.get("aggregator", float("nan")), 1), "mosquitto": round(peaks.get("mosquitto", float("nan")), 1),
                         "hosts": {k: round(v, 1) for k, v in peaks.items() if k.startswith("agents")}},
        "connect_seconds": {k: round(v.get("connect_seconds", float("nan")), 1) for k, v in report.get("hosts", {}).items()},
        "rounds": per_round,
    }


# ---------------------------------------------------------------------- fan-out alone (no aggregator)


async def fanout(agents: int, hosts: int, params: int, tmp: Path) -> dict[str, Any]:
    """One announcement to ``agents`` synthetic devices, one MQTT connection each, nobody invited:
    what a round costs a broker in downloads when only a cohort uploads. The bench publishes the
    announcement and the final model back to back (each subscriber gets them in order) and reads
    when each host's first and last device got the announcement from the hosts' ledgers."""
    import asyncio

    from broker import LocalBroker
    from fedge.peak_memory import ENV as PEAK_ENV
    from fedge.peak_memory import proc_peak_rss_mib
    from fedge.simulate.limits import raise_fd_limit
    from fedge_contract import GlobalModel, Presence, TaskConfig, Topics
    from fedge_contract.codecs import encode_weights, parse_chain
    from fedge_contract.cohort import InviteSet, Participation
    from fedge_contract.mqtt import BrokerAddress, make_client
    from fedge_contract.tensors import ModelSpec
    from fedge_tasks.synthetic import SyntheticTask
    from fedge_tasks.weights import get_weights

    raise_fd_limit(agents + 512)
    topics, ids = Topics(FLEET), [f"agent-{i}" for i in range(agents)]
    weights = get_weights(SyntheticTask(params=params).build_model())
    spec = ModelSpec.of(weights)
    nobody = Participation(InviteSet.of([], fleet=FLEET, round_no=1, bits=20))

    def announcement(final: bool) -> bytes:
        return GlobalModel(FLEET, 0 if not final else 1, 1, None, TaskConfig(), spec.fingerprint,
                           encode_weights(weights, parse_chain("none")), final=final, cohort=nobody).to_bytes()

    async with LocalBroker(data_dir=tmp / "fanout-broker") as broker:
        address = BrokerAddress.parse(broker.url)
        started = time.monotonic()
        procs = []
        for h in range(hosts):
            env = {**os.environ, PEAK_ENV: str(tmp / f"fanout-host-{h}.peak.json")}
            procs.append(await asyncio.create_subprocess_exec(
                sys.executable, "-m", "fedge", "_agent-host", "--synthetic", f"--broker={broker.url}", f"--fleet={FLEET}",
                f"--client-ids={','.join(ids[h::hosts])}", f"--state-root={tmp}", "--downloads=all",
                f"--ledger={tmp / f'fanout-host-{h}.json'}", "--log-level=warning", env=env,
                stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL))
        async with make_client(address, "fedge-bench-fanout", persistent=False) as client:
            await client.subscribe(topics.all_presence, qos=1)
            online: set[str] = set()
            async for message in client.messages:
                presence = Presence.from_bytes(message.payload)  # type: ignore[arg-type]
                (online.add if presence.state == "online" else online.discard)(presence.client_id)
                if len(online) == agents:
                    break
            connected = time.monotonic() - started
            payload = announcement(final=False)
            sent = time.time()
            await client.publish(topics.global_model, payload, qos=1, retain=True)
            await client.publish(topics.global_model, announcement(final=True), qos=1, retain=True)
            for proc in procs:
                await proc.wait()
        broker_peak = proc_peak_rss_mib(broker.pid) if broker.pid else None
    ledgers = [json.loads((tmp / f"fanout-host-{h}.json").read_text()) for h in range(hosts)]
    arrivals = [ledger["rounds"]["1"] for ledger in ledgers]
    peaks = [json.loads((tmp / f"fanout-host-{h}.peak.json").read_text())["peak_rss_mib"] for h in range(hosts)]
    return {
        "agents": agents, "hosts": hosts, "announcement_bytes": len(payload), "bytes_to_devices": len(payload) * agents,
        "connect_seconds": round(connected, 1), "first_arrival_seconds": round(min(a["model_first"] for a in arrivals) - sent, 2),
        "last_arrival_seconds": round(max(a["model_last"] for a in arrivals) - sent, 2),
        "trained": int(sum(a["trained"] for a in arrivals)),
        "peak_rss_mib": {"mosquitto": round(broker_peak or float("nan"), 1), "hosts": [round(p, 1) for p in peaks]},
    }


# ---------------------------------------------------------------------- training (digits)


def training_arm(agents: int, target: int, rounds: int, over_select: float | None, tmp: Path, eval_fraction: float) -> dict[str, Any]:
    name = "train-cohort" if over_select else "train-everyone"
    args = [f"--agents={agents}", f"--target={target}", f"--rounds={rounds}", "--alpha=0.5", "--deadline=120",
            f"--over-select={over_select or 0}", "--eval-every=1", f"--eval-fraction={eval_fraction}"]
    out = tmp / name
    report, wall = simulate(out, *args, "--task-opt=min_samples=5", timeout=3600)
    curve = [row["accuracy"] for row in report["rounds"]]
    to_090 = next((row["round"] for row in report["rounds"] if row["accuracy"] >= 0.90), None)
    seconds = [row.get("train_seconds") or 0.0 for row in report["rounds"]]
    return {
        "arm": name, "over_select": over_select, "wall_seconds": round(wall, 1), "final_accuracy": round(curve[-1], 4),
        "rounds_to_090": to_090, "device_train_seconds": round(sum(seconds), 2),
        "updates_published": sum(row["updates_published"] for row in report["rounds"]),
        "device_train_seconds_to_090": round(sum(seconds[:to_090]), 2) if to_090 else None,
        "accuracy": [round(a, 4) for a in curve], "store": str(out / "aggregator.sqlite"),
        "trained_per_round": statistics.mean(row["updates_published"] for row in report["rounds"]),
        "invited_per_round": statistics.mean(row.get("invited") or agents for row in report["rounds"]),
        "federated_eval": live_federated_eval(report["rounds"]),
    }


def _rounded(value: float | None) -> float | None:
    return round(value, 4) if value is not None else None


def live_federated_eval(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The run's own federated evaluation (--eval-every 1): each round's fed_accuracy (the devices asked by the
    hash rule, on their own held-out splits) against the aggregator's server-side accuracy of the same model."""
    pairs = [(row["round"], row["accuracy"], row.get("fed_accuracy"), row.get("fed_devices")) for row in rows]
    diffs = [fed - server for _, server, fed, _ in pairs if fed is not None and server is not None]
    return {
        "rounds": [{"round": r, "server_accuracy": _rounded(server), "federated_accuracy": _rounded(fed), "devices": devices,
                    "difference": _rounded(fed - server if fed is not None and server is not None else None)}
                   for r, server, fed, devices in pairs],
        "mean_abs_difference": round(statistics.mean(abs(d) for d in diffs), 4) if diffs else None,
        "max_abs_difference": round(max(abs(d) for d in diffs), 4) if diffs else None,
        "mean_difference": round(statistics.mean(diffs), 4) if diffs else None,
    }


# ---------------------------------------------------------------------- training in one process (the goal, before the aggregator selects)


def training_in_process(agents: int, target: int, rounds: int, over_select: float | None, seed: int = 0) -> dict[str, Any]:
    """The same comparison with the agents' trainer, the selection rule and FedAvg in one process:
    who trains each round is the cohort (or everyone), the first ``target`` to finish are folded
    (finishing order: a seeded shuffle per round, the devices being equally fast), the rest are
    stale. Uncompressed deltas. Shows what the wired aggregator should reach."""
    from aggregator.aggregation.fold import WeightedSum
    from aggregator.aggregation.strategies import FedAvg
    from aggregator.rounds.cohort import Candidate, CohortPolicy, CohortSelector
    from edge_agent.trainer import LocalTrainer
    from fedge_contract import GlobalModel, TaskConfig
    from fedge_contract.codecs import encode_weights, parse_chain
    from fedge_contract.tensors import ModelSpec
    from fedge_tasks.base import server_eval_data
    from fedge_tasks.digits import DigitsTask
    from fedge_tasks.loops import evaluate
    from fedge_tasks.runtime import limit_torch_threads
    from fedge_tasks.weights import get_weights, set_weights

    limit_torch_threads(1)  # as every agent does: torch's default threads spin for ms per call on 2 cores
    task = DigitsTask(clients=agents, alpha=0.5, seed=seed, init_seed=seed, min_samples=5)
    training = TaskConfig(**{**task.suggested_training(), "codec": "none"})
    ids = [f"agent-{i}" for i in range(agents)]
    trainers = {c: LocalTrainer(task, c, seed) for c in ids}
    weights = get_weights(task.build_model())
    spec = ModelSpec.of(weights)
    eval_model, eval_data = task.build_model(), server_eval_data(task)
    selector = CohortSelector(CohortPolicy(target=target, over_select=over_select or 1.0, seed=seed))
    curve, seconds, batches, trained, wasted = [], 0.0, 0, 0, 0
    counts = dict.fromkeys(ids, 0)
    for number in range(1, rounds + 1):
        cohort = sorted(selector.select(number, [Candidate(c) for c in ids]).invited) if over_select else ids
        model = GlobalModel(FLEET, number - 1, number, None, training, spec.fingerprint, encode_weights(weights, parse_chain("none")))
        finished = []
        for client in cohort:
            local = trainers[client].run(model, lambda: True)
            assert local is not None
            seconds += local.result.seconds
            batches += local.result.batches
            finished.append((client, local))
        random.Random(f"{seed}:arrival:{number}").shuffle(finished)
        total = WeightedSum(spec)
        for client, local in finished[:target]:
            total.add(local.delta, float(local.result.num_samples))
            counts[client] += 1
        trained, wasted = trained + len(finished), wasted + max(0, len(finished) - target)
        weights = FedAvg().apply(weights, total.mean())
        set_weights(eval_model, weights)
        curve.append(float(evaluate(eval_model, eval_data)["accuracy"]))
    to_090 = next((i + 1 for i, a in enumerate(curve) if a >= 0.90), None)
    return {
        "arm": "cohort" if over_select else "everyone", "over_select": over_select, "final_accuracy": round(curve[-1], 4),
        "rounds_to_090": to_090, "trained_per_round": trained / rounds, "wasted_per_round": wasted / rounds,
        "device_train_seconds": round(seconds, 2), "device_train_batches": batches,
        "folded_per_device_stdev": round(statistics.pstdev(counts.values()), 2),
        "accuracy": [round(a, 4) for a in curve],
    }


# ---------------------------------------------------------------------- federated vs server evaluation


def federated_vs_server(store: Path, agents: int, fraction: float) -> dict[str, Any]:
    """Each version of a finished run: server accuracy, and what the devices asked by the hash rule report."""
    from aggregator.observability.federated_eval import reduce_reports
    from edge_agent.evaluator import LocalEvaluator
    from fedge_contract import GlobalModel, TaskConfig
    from fedge_contract.codecs import encode_weights, parse_chain
    from fedge_contract.cohort import Participation, eval_threshold
    from fedge_contract.evaluation import EvalReport
    from fedge_contract.messages import unpack_weights
    from fedge_contract.tensors import ModelSpec
    from fedge_tasks.base import server_eval_data
    from fedge_tasks.digits import DigitsTask
    from fedge_tasks.loops import evaluate
    from fedge_tasks.weights import set_weights

    task = DigitsTask(clients=agents, alpha=0.5, seed=0, init_seed=0, min_samples=5)
    server_model, server_data = task.build_model(), server_eval_data(task)
    ids = [f"agent-{i}" for i in range(agents)]
    evaluators = {c: LocalEvaluator(task, c) for c in ids}
    rule = Participation(eval_threshold=eval_threshold(fraction))
    with sqlite3.connect(f"file:{store}?mode=ro", uri=True) as db:  # the store's checkpoints, read-only
        rows = db.execute("SELECT version, weights FROM checkpoints ORDER BY version").fetchall()
    out = []
    for version, blob in rows:
        weights = unpack_weights(blob)
        set_weights(server_model, weights)
        server = evaluate(server_model, server_data)
        model = GlobalModel(FLEET, version, version + 1, None, TaskConfig(), ModelSpec.of(weights).fingerprint,
                            encode_weights(weights, parse_chain("none")))
        reports = []
        for client in ids:
            if rule.asks_eval(client, fleet=FLEET, model_version=version):
                outcome = evaluators[client].run(model)
                if outcome is not None:
                    reports.append(EvalReport(FLEET, client, version, outcome.num_samples, outcome.loss, outcome.accuracy))
        fed = reduce_reports(reports)
        everyone = reduce_reports([EvalReport(FLEET, c, version, o.num_samples, o.loss, o.accuracy)
                                   for c in ids if (o := evaluators[c].run(model)) is not None])
        out.append({
            "version": version, "server_accuracy": round(server["accuracy"], 4),
            "federated_accuracy": round(fed.accuracy, 4) if fed else None, "devices": fed.devices if fed else 0,
            "samples": fed.samples if fed else 0, "difference": round(fed.accuracy - server["accuracy"], 4) if fed else None,
            "all_devices_accuracy": round(everyone.accuracy, 4) if everyone else None,
        })
    diffs = [abs(r["difference"]) for r in out if r["difference"] is not None]
    return {"fraction": fraction, "rounds": out, "mean_abs_difference": round(statistics.mean(diffs), 4) if diffs else None,
            "max_abs_difference": round(max(diffs), 4) if diffs else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=["fanout", "fleet", "training", "in_process", "federated_eval", "all"], default="all")
    parser.add_argument("--agents", type=int, default=10_000)
    parser.add_argument("--target", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--params", type=int, default=10_000, help="synthetic model size (digits' MLP has 9,610)")
    parser.add_argument("--train-agents", type=int, default=100)
    parser.add_argument("--train-target", type=int, default=20)
    parser.add_argument("--train-rounds", type=int, default=30)
    parser.add_argument("--eval-fraction", type=float, default=0.1)
    args = parser.parse_args()
    selects = aggregator_selects()
    pending = "needs the aggregator's --over-select (issue 15's aggregator side)"
    result: dict[str, Any] = {"benchmark": "participation", "aggregator_selects": selects}
    with tempfile.TemporaryDirectory(prefix="fedge-participation-") as folder:
        tmp = Path(folder)
        if args.part in ("fanout", "all"):
            import asyncio

            result["fanout"] = asyncio.run(fanout(args.agents, -(-args.agents // 2500), args.params, tmp))
        if args.part in ("fleet", "all"):
            result["fleet"] = {"everyone": fleet_arm(args.agents, args.target, args.rounds, args.params, None, tmp),
                               "cohort": fleet_arm(args.agents, args.target, args.rounds, args.params, 1.3, tmp) if selects else pending}
        if args.part in ("in_process", "all"):
            result["in_process"] = {arm: training_in_process(args.train_agents, args.train_target, args.train_rounds, over)
                                    for arm, over in (("everyone", None), ("cohort", 1.3))}
        if args.part in ("training", "federated_eval", "all"):
            everyone = training_arm(args.train_agents, args.train_target, args.train_rounds, None, tmp, args.eval_fraction)
            if args.part in ("training", "all"):
                result["training"] = {"everyone": everyone, "cohort": training_arm(
                    args.train_agents, args.train_target, args.train_rounds, 1.3, tmp, args.eval_fraction) if selects else pending}
            if args.part in ("federated_eval", "all"):
                result["federated_eval"] = federated_vs_server(Path(everyone["store"]), args.train_agents, args.eval_fraction)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
