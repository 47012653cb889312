"""Issue 4's codec benchmark: bytes, speed, and accuracy against bytes for each update codec chain.

Part 1 (sizes and speed) encodes one delta per model with every chain and reports the size of the
whole Update message (envelope included, in the compact form agents send, as the broker sees it), its ratio to the same Update in
raw float32 (chain ``none``), and encode / decode / encode+decode throughput in MB/s of float32
input (best of a few repetitions after a warm-up, one thread). The models: the digits MLP with a
real delta (one round of local training with the task's suggested settings on agent-0's shard),
and 1M / 10M parameter deltas drawn from N(0, 0.01^2) (random normal, not trained: top-k and
quantisation see no structure, zstd finds little to squeeze).

Part 2 (accuracy against bytes) runs ``fedge simulate --agents 20 --rounds 30`` (digits,
Dirichlet 0.5, seed 0) once per chain and reports the final accuracy, the total bytes uploaded,
the bytes uploaded until the test accuracy first reaches 0.90, and that figure's ratio to the
float32 run's.

Part 3 (issue 16: both directions) runs chain pairs (upload, broadcast) in one process with
bench/broadcast.py's harness (digits, 20 devices, 30 rounds, Dirichlet 0.5, the agent's trainer and
error feedback, the aggregator's fold and FedAvg, delta broadcasts with server-side error feedback
rebuilt bit for bit by every device) and reports, per device, the bytes up, down and total until
the model devices hold first scores 0.90 (downloads of versions 0..r, uploads of rounds 1..r),
where they go (tensor data or envelope), the final accuracy, and the total's ratio to float32 both
ways. A broadcast ``f32`` is today's full float32 GlobalModel; anything else is a delta chain.
The goal: at least 50x fewer bytes than float32 both ways, within 1 point of its final accuracy.

Part 4 times delta broadcasts of 1M and 10M-parameter random-walk models: the aggregator's encode
per version, a device's rebuild, bytes per version (bench/broadcast.py, part 2).

Part 5 (issue 16, end to end) runs the same chain pairs through ``fedge simulate`` (digits, 20
devices, 30 rounds, Dirichlet 0.5; a real broker, the aggregator and the agents as processes):
``--codec UP`` with ``--broadcast-chain DOWN`` (delta broadcasts, the default) or
``--no-delta-broadcasts`` for a float32 broadcast (``f32``). Bytes come from the wire tap (each
announcement and update as the broker carried it) per device; "to 0.90" counts, up to the first
round r whose model (the held model, what devices run) scores >= 0.90, the uploads of rounds
1..r and the downloads of versions 0..r (the announcements of rounds 1..r+1, or the final one),
plus what devices fetched to catch up (their own counts; none in a clean run). The ratio compares
with float32 both ways of the same seed.

Prints JSON, then markdown tables.
Run: python -m bench.codecs [--no-sim] [--no-pairs] [--sizes 1e6,1e7] [--pairs UP/DOWN,...] [--pair-seeds 0,1,2]
     [--sim-pairs] [--sim-pair-seeds 0,1,2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from fedge_contract import TaskConfig, Update, new_update_id
from fedge_contract.broadcast.policy import DEFAULT_BROADCAST_CHAIN
from fedge_contract.codecs import decode_weights, encode_weights, parse_chain
from fedge_contract.tensors import ModelSpec

CHAINS = [
    "none", "f16+zstd", "q8+zstd", "q4+zstd", "topk:0.1+q8+zstd", "topk:0.01+q8+zstd",
    "flat+topk:0.01+q8+zstd", "flat+topk:0.01+q4+zstd",  # model-wide top-k: one tensor, one frame
    "flat+topk:0.01+rice+q4",  # Rice-coded positions (no zstd: it would only add its frame)
    "flat+topk:0.01+rice+sign", "flat+topk:0.02+rice+sign",  # one bit a value (error feedback absorbs the rest)
]
TARGET_ACCURACY = 0.90
TARGET_RATIO = 50.0
TARGET_MBPS = 200.0
UPLOAD_DEFAULT = TaskConfig().codec
BROADCAST_DEFAULT = DEFAULT_BROADCAST_CHAIN
OLD_UPLOAD, OLD_BROADCAST = "flat+topk:0.01+q4+zstd", "flat+topk:0.05+q4+zstd"  # the defaults before Rice positions and sign values
# (upload, broadcast): "f32" broadcasts the full float32 model (today), anything else is a delta chain
PAIRS = [
    ("none", "f32"),  # float32 both ways: the baseline (first)
    (OLD_UPLOAD, "f32"),  # before issue 16: compressed uploads, float32 downloads
    (OLD_UPLOAD, OLD_BROADCAST),  # the first delta broadcasts' defaults (compact envelopes now)
    ("flat+topk:0.01+rice+q4", "flat+topk:0.05+rice+q4"),  # the same values, Rice-coded positions
    ("flat+topk:0.02+rice+q4", "flat+topk:0.05+rice+q4"),
    ("flat+topk:0.01+rice+sign", "flat+topk:0.05+rice+sign"),
    (UPLOAD_DEFAULT, BROADCAST_DEFAULT),  # the defaults: flat+topk:0.02+rice+sign / flat+topk:0.05+rice+sign
    (UPLOAD_DEFAULT, "flat+topk:0.03+rice+sign"),
    ("flat+topk:0.03+rice+sign", BROADCAST_DEFAULT),
]
BROADCAST_SIZE_CHAINS = [OLD_BROADCAST, "flat+topk:0.05+rice+q4+zstd", BROADCAST_DEFAULT, "flat+topk:0.03+rice+sign", "flat+q8+zstd"]


def digits_delta() -> dict[str, np.ndarray]:
    """A real update: one round of local training of the digits MLP on agent-0's shard."""
    from edge_agent.trainer import training_seed
    from fedge_tasks import TrainSettings, train
    from fedge_tasks.digits import DigitsTask
    from fedge_tasks.weights import get_weights

    task = DigitsTask()
    model = task.build_model()
    start = get_weights(model)
    s = task.suggested_training()
    settings = TrainSettings(epochs=int(s["local_epochs"]), batch_size=int(s["batch_size"]), lr=float(s["lr"]), seed=training_seed(0, "agent-0", 1))
    train(model, task.train_data("agent-0"), settings)
    local = get_weights(model)
    return {name: (local[name] - start[name]).astype(np.float32) for name in start}


def random_delta(parameters: int, seed: int = 0) -> dict[str, np.ndarray]:
    """A delta of ``parameters`` values as a few layer-like tensors, N(0, 0.01^2)."""
    rng = np.random.default_rng(seed)
    side = 1024
    rows = parameters // side
    rest = parameters - rows * side
    delta = {"layer.weight": (rng.standard_normal((rows, side), dtype=np.float32) * 0.01)}
    if rest:
        delta["layer.bias"] = rng.standard_normal(rest, dtype=np.float32) * 0.01
    return delta


def update_bytes(tensors: Any) -> int:
    update = Update(
        fleet="sim", client_id="agent-0", update_id=new_update_id(), round=12, base_version=12, num_samples=57, tensors=tensors,
        metrics={"loss": 0.1234567, "accuracy": 0.93, "train_seconds": 0.0456},
    )
    return len(update.to_bytes(compact=True))  # the form agents send an aggregator of this contract (it asks for it)


def measure(delta: dict[str, np.ndarray], chain_text: str, repeats: int) -> dict[str, float]:
    chain = parse_chain(chain_text)
    spec = ModelSpec.of(delta)
    raw_mb = spec.nbytes / 1e6
    rng = np.random.default_rng(0)
    tensors = encode_weights(delta, chain, rng)  # warm-up (page faults, lazy imports)
    decode_weights(tensors, spec)
    encode_s = decode_s = both_s = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        tensors = encode_weights(delta, chain, rng)
        t1 = time.perf_counter()
        decode_weights(tensors, spec)
        t2 = time.perf_counter()
        encode_s, decode_s, both_s = min(encode_s, t1 - t0), min(decode_s, t2 - t1), min(both_s, t2 - t0)
    return {
        "bytes": update_bytes(tensors),
        "encode_mbps": round(raw_mb / encode_s, 1),
        "decode_mbps": round(raw_mb / decode_s, 1),
        "encode_decode_mbps": round(raw_mb / both_s, 1),
    }


def sizes_and_speed(models: dict[str, dict[str, np.ndarray]]) -> list[dict[str, Any]]:
    rows = []
    for model_name, delta in models.items():
        parameters = sum(v.size for v in delta.values())
        repeats = 20 if parameters < 100_000 else 5 if parameters < 5_000_000 else 3
        raw = None
        for chain in CHAINS:
            row = measure(delta, chain, repeats)
            raw = raw or row["bytes"]
            rows.append({"model": model_name, "parameters": parameters, "chain": chain, **row, "ratio": round(raw / row["bytes"], 2)})
    return rows


def simulate(chain: str, agents: int, rounds: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="fedge-bench-codecs-") as tmp:
        out = Path(tmp) / "run"
        subprocess.run(
            [sys.executable, "-m", "fedge", "simulate", f"--agents={agents}", f"--rounds={rounds}", f"--codec={chain}", f"--out={out}", "--quiet"],
            check=True, capture_output=True, stdin=subprocess.DEVNULL,
        )
        report = json.loads((out / "report.json").read_text())
    cumulative, reached = 0, None
    for row in report["rounds"]:
        cumulative += row["bytes_up"]
        if reached is None and row["accuracy"] is not None and row["accuracy"] >= TARGET_ACCURACY:
            reached = {"round": row["round"], "bytes_up": cumulative}
    return {
        "chain": chain,
        "final_accuracy": round(report["totals"]["final_accuracy"], 4),
        "bytes_up": report["totals"]["bytes_up"],
        "round_to_090": reached["round"] if reached else None,
        "bytes_to_090": reached["bytes_up"] if reached else None,
        "accuracy_by_round": [round(r["accuracy"], 4) for r in report["rounds"]],
    }


def accuracy_vs_bytes(chains: list[str], agents: int, rounds: int) -> list[dict[str, Any]]:
    runs = [simulate(chain, agents, rounds) for chain in chains]
    base = runs[0]
    assert base["chain"] == "none"
    for run in runs:
        run["ratio_to_090"] = round(base["bytes_to_090"] / run["bytes_to_090"], 2) if run["bytes_to_090"] and base["bytes_to_090"] else None
        run["ratio_total"] = round(base["bytes_up"] / run["bytes_up"], 2)
        run["accuracy_gap"] = round(base["final_accuracy"] - run["final_accuracy"], 4)
        run["meets_target"] = bool(run["ratio_to_090"] and run["ratio_to_090"] >= TARGET_RATIO and run["accuracy_gap"] <= 0.01)
    return runs


def chain_pairs(pairs: list[tuple[str, str]], seeds: list[int], agents: int, rounds: int, alpha: float) -> list[dict[str, Any]]:
    """Part 3: each (upload, broadcast) pair through bench/broadcast.py's in-process fleet, per seed."""
    from bench.broadcast import Setting, compare, federated_run
    from fedge_contract.broadcast import BroadcastPolicy

    if pairs[0] != ("none", "f32"):
        raise ValueError("the first pair must be none/f32: float32 both ways is what the ratios compare with")
    rows: list[dict[str, Any]] = []
    for seed in seeds:
        runs: list[dict[str, Any]] = []
        for upload, down in pairs:
            label = f"{upload} / {down}"
            setting = Setting(label, upload, full="none") if down == "f32" else Setting(label, upload, policy=BroadcastPolicy(chain=down))
            run = federated_run(setting, agents, rounds, seed, alpha)
            run.update(upload=upload, broadcast_chain=down, seed=seed, label="float32" if not runs else label)
            runs.append(run)
            print(json.dumps({k: v for k, v in run.items() if k != "accuracy_by_round"}), file=sys.stderr, flush=True)
        compare(runs)
        rows += runs
    return rows


def simulated_pair(upload: str, down: str, seed: int, agents: int, rounds: int, alpha: float) -> dict[str, Any]:
    """One ``fedge simulate`` run of the pair, its bytes per device (see part 5 in the module docstring)."""
    broadcast = ["--no-delta-broadcasts"] if down == "f32" else [f"--broadcast-chain={down}"]
    with tempfile.TemporaryDirectory(prefix="fedge-bench-pairs-") as tmp:
        out = Path(tmp) / "run"
        started = time.perf_counter()
        subprocess.run(
            [sys.executable, "-m", "fedge", "simulate", f"--agents={agents}", f"--rounds={rounds}", f"--alpha={alpha}", f"--seed={seed}",
             f"--codec={upload}", *broadcast, f"--out={out}", "--quiet"],
            check=True, capture_output=True, stdin=subprocess.DEVNULL,
        )
        seconds = time.perf_counter() - started
        report = json.loads((out / "report.json").read_text())
        from aggregator.store import Store

        with Store(out / "aggregator.sqlite", readonly=True) as store:
            true_accuracy = store.rounds()[-1]["metrics"].get("true_accuracy")
    rows = report["rounds"]
    up = [row["bytes_up"] / agents for row in rows]
    downs = [row["bytes_down"] / agents for row in rows] + [report["final_global_bytes"] / agents]  # versions 0 .. rounds
    catch_up = report["totals"].get("catch_up_bytes") or 0
    accuracy = [row["accuracy"] for row in rows]
    reached = next((r for r, a in enumerate(accuracy, start=1) if a is not None and a >= TARGET_ACCURACY), None)
    all_down = sum(downs) + catch_up / agents
    run: dict[str, Any] = {
        "upload": upload, "broadcast_chain": down, "seed": seed, "final_accuracy": round(accuracy[-1], 4),
        "final_accuracy_true_model": round(true_accuracy, 4) if true_accuracy is not None else None,
        "round_to_090": reached,
        "bytes_per_device": {"up": round(sum(up)), "down": round(all_down), "total": round(sum(up) + all_down)},
        "down_per_version": {"v0": round(downs[0]), "mean_after_v0": round(statistics.fmean(downs[1:])), "max": round(max(downs))},
        "up_per_round_mean": round(statistics.fmean(up)),
        "catch_up_bytes_all_devices": catch_up,
        "bytes_retained": report["totals"].get("bytes_retained", 0),
        "accuracy_by_round": [round(a, 4) for a in accuracy],
        "wall_seconds": round(seconds, 1),
    }
    if reached is not None:
        to_up, to_down = sum(up[:reached]), sum(downs[: reached + 1]) + catch_up / agents
        run["bytes_to_090"] = {"up": round(to_up), "down": round(to_down), "total": round(to_up + to_down)}
    return run


def simulated_pairs(pairs: list[tuple[str, str]], seeds: list[int], agents: int, rounds: int, alpha: float) -> list[dict[str, Any]]:
    """Part 5: each (upload, broadcast) pair through ``fedge simulate``, per seed; ratios to float32 both ways of that seed."""
    from bench.broadcast import compare

    if pairs[0] != ("none", "f32"):
        raise ValueError("the first pair must be none/f32: float32 both ways is what the ratios compare with")
    rows: list[dict[str, Any]] = []
    for seed in seeds:
        runs = []
        for upload, down in pairs:
            run = simulated_pair(upload, down, seed, agents, rounds, alpha)
            run["label"] = "float32" if not runs else f"{upload} / {down}"
            runs.append(run)
            print(json.dumps({k: v for k, v in run.items() if k != "accuracy_by_round"}), file=sys.stderr, flush=True)
        compare(runs)  # the in-process harness's ratios, gaps and goal (bench/broadcast.py)
        rows += runs
    return rows


def broadcast_sizes(parameters: list[int], chains: list[str], versions: int = 4) -> list[dict[str, Any]]:
    """Part 4: encode time, device rebuild time and bytes per version of 1M/10M-parameter delta broadcasts."""
    from bench.broadcast import size_row

    return [size_row(n, chain, versions) for n in parameters for chain in chains]


def markdown(result: dict[str, Any]) -> str:
    lines = [
        "| model | params | chain | bytes/update | ratio | encode MB/s | decode MB/s | enc+dec MB/s |",
        "|---|---:|---|---:|---:|---:|---:|---:|",
    ]
    for r in result["sizes"]:
        lines.append(
            f"| {r['model']} | {r['parameters']:,} | `{r['chain']}` | {r['bytes']:,} | {r['ratio']:.1f}x | "
            f"{r['encode_mbps']:,.0f} | {r['decode_mbps']:,.0f} | {r['encode_decode_mbps']:,.0f} |"
        )
    if result.get("simulate"):
        lines += [
            "",
            "| chain | final accuracy | bytes up (30 rounds) | round reaching 0.90 | bytes up to 0.90 | ratio to float32 at 0.90 |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for r in result["simulate"]:
            reach = f"{r['bytes_to_090']:,}" if r["bytes_to_090"] else "never"
            ratio = f"{r['ratio_to_090']:.1f}x" if r["ratio_to_090"] else "-"
            lines.append(f"| `{r['chain']}` | {r['final_accuracy']:.4f} | {r['bytes_up']:,} | {r['round_to_090'] or '-'} | {reach} | {ratio} |")
    if result.get("pairs"):
        lines += [
            "",
            "| seed | upload | broadcast | final acc | round to 0.90 | up to 0.90 | down to 0.90 | total to 0.90 | vs float32 both ways | "
            "envelope share |",
            "|---:|---|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in result["pairs"]:
            got: dict[str, int] = r.get("bytes_to_090") or {}
            split: dict[str, int] = r.get("bytes_to_090_split") or {}
            envelope = f"{(split['up_envelope'] + split['down_envelope']) / got['total']:.0%}" if got else "-"
            ratio = f"{r['ratio_to_090']:.1f}x" if r["ratio_to_090"] else "-"
            lines.append(
                f"| {r['seed']} | `{r['upload']}` | `{r['broadcast_chain']}` | {r['final_accuracy']:.3f} | {r['round_to_090'] or '-'} | "
                f"{got.get('up', 0):,} | {got.get('down', 0):,} | {got.get('total', 0):,} | {ratio} | {envelope} |"
            )
    if result.get("simulated_pairs"):
        lines += [
            "",
            "| seed | upload | broadcast | final acc (true) | round to 0.90 | up to 0.90 | down to 0.90 | total to 0.90 | "
            "vs float32 both ways | down/version | 30 rounds total |",
            "|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in result["simulated_pairs"]:
            got = r.get("bytes_to_090") or {}
            ratio = f"{r['ratio_to_090']:.1f}x" if r["ratio_to_090"] else "-"
            true = f" ({r['final_accuracy_true_model']:.3f})" if r["final_accuracy_true_model"] is not None else ""
            lines.append(
                f"| {r['seed']} | `{r['upload']}` | `{r['broadcast_chain']}` | {r['final_accuracy']:.3f}{true} | {r['round_to_090'] or '-'} | "
                f"{got.get('up', 0):,} | {got.get('down', 0):,} | {got.get('total', 0):,} | {ratio} | "
                f"{r['down_per_version']['mean_after_v0']:,} | {r['bytes_per_device']['total']:,} |"
            )
    if result.get("broadcast_sizes"):
        lines += [
            "",
            "| params | broadcast chain | bytes/version | vs float32 | encode s | device rebuild s | keyframe bytes |",
            "|---:|---|---:|---:|---:|---:|---:|",
        ]
        for r in result["broadcast_sizes"]:
            lines.append(f"| {r['parameters']:,} | `{r['chain']}` | {r['bytes_per_version']:,} | {r['ratio_to_float32']:.1f}x | "
                         f"{r['encode_seconds']:.3f} | {r['device_rebuild_seconds']:.3f} | {r['keyframe_bytes']:,} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="1e6,1e7", help="parameter counts of the random deltas (comma separated)")
    parser.add_argument("--no-sim", action="store_true", help="skip the accuracy-against-bytes simulations")
    parser.add_argument("--sim-chains", default=",".join(CHAINS), help="chains to simulate (the first must be none)")
    parser.add_argument("--agents", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--no-pairs", action="store_true", help="skip the (upload, broadcast) chain pairs")
    parser.add_argument("--pairs", default=",".join(f"{u}/{d}" for u, d in PAIRS), help="UPLOAD/BROADCAST,... (the first must be none/f32)")
    parser.add_argument("--pair-seeds", default="0", help="seeds of the pair runs (comma separated)")
    parser.add_argument("--alpha", type=float, default=0.5)
    parser.add_argument("--no-broadcast-sizes", action="store_true", help="skip the 1M/10M broadcast timings")
    parser.add_argument("--sim-pairs", action="store_true", help="part 5: the chain pairs through fedge simulate (minutes per run)")
    parser.add_argument("--sim-pair-seeds", default="0", help="seeds of the simulated pair runs (comma separated)")
    parser.add_argument("--no-sizes-speed", action="store_true", help="skip part 1 (sizes and speed of each update chain)")
    args = parser.parse_args()

    result: dict[str, Any] = {"sizes": []}
    if not args.no_sizes_speed:
        models = {"digits-mlp": digits_delta()}
        for size in (int(float(s)) for s in args.sizes.split(",") if s):
            models[f"random-{size / 1e6:g}M"] = random_delta(size)
        result["sizes"] = sizes_and_speed(models)
    if not args.no_sim:
        result["simulate"] = accuracy_vs_bytes(args.sim_chains.split(","), args.agents, args.rounds)
    if not args.no_pairs:
        pairs = [tuple(p.split("/", 1)) for p in args.pairs.split(",") if p]
        result["pairs"] = chain_pairs(pairs, [int(s) for s in args.pair_seeds.split(",")], args.agents, args.rounds, args.alpha)  # type: ignore[arg-type]
    if args.sim_pairs:
        pairs = [tuple(p.split("/", 1)) for p in args.pairs.split(",") if p]
        result["simulated_pairs"] = simulated_pairs(pairs, [int(s) for s in args.sim_pair_seeds.split(",")],  # type: ignore[arg-type]
                                                    args.agents, args.rounds, args.alpha)
    if not args.no_broadcast_sizes:
        result["broadcast_sizes"] = broadcast_sizes([int(float(s)) for s in args.sizes.split(",") if s], BROADCAST_SIZE_CHAINS)
    big = [r for r in result["sizes"] if r["chain"] == "q8+zstd" and r["parameters"] >= 10_000_000]
    result["targets"] = {
        "q8_zstd_10m_encode_decode_mbps": big[0]["encode_decode_mbps"] if big else None,
        "q8_zstd_10m_meets_200": bool(big and big[0]["encode_decode_mbps"] >= TARGET_MBPS),
        "chains_meeting_50x_at_090_within_1pt": [r["chain"] for r in result.get("simulate", []) if r["meets_target"]],
        "pairs_meeting_50x_both_ways_within_1pt": sorted({r["label"] for r in result.get("pairs", []) if r["meets_goal"]}),
        "simulated_pairs_meeting_50x_both_ways_within_1pt": sorted({f"{r['label']} (seed {r['seed']})"
                                                                    for r in result.get("simulated_pairs", []) if r["meets_goal"]}),
    }
    print(json.dumps(result, indent=2))
    print()
    print(markdown(result))


if __name__ == "__main__":
    main()
