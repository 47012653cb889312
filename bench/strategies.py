"""Issue 7's benchmark: server strategies on non-IID digits, and sync FedAvg against async FedBuff.

Part 1 runs ``fedge simulate --agents 20 --rounds 30`` (digits, seed 0, every agent every round,
the task's suggested local training: 3 epochs, batch 16, lr 0.5) for each strategy at Dirichlet
alpha 0.1 and 0.5, and reports the rounds and wall seconds until the test accuracy first reaches
0.90, and the accuracy after 30 rounds. FedProx is FedAvg with the agents' proximal term (--mu).

Part 2 makes 30% of the agents 5x slower and compares sync FedAvg (a round waits for everyone)
with async FedBuff (a new version every 10 updates, staleness weight 1/sqrt(1+s)), in wall-clock
seconds to 0.90. Training is serialised on one worker thread in the simulator (~8 ms per agent),
so a slowdown of the *real* training time would be invisible next to the round's fixed costs: every
agent's training is emulated to last 0.5 s (``--emulated-train-seconds``), the stragglers' 2.5 s.

"Wall seconds to 0.90" is the sum of the report's per-round seconds up to that round: from the
first model's announcement to the announcement of the first model scoring >= 0.90 (process start
excluded). Runs share a 2-core machine: compare within one run of this script.

Prints JSON, then a markdown table. Run: python -m bench.strategies [--alphas 0.1,0.5] [--no-async] [--only fedadam,...]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

TARGET_ACCURACY = 0.90
ROUNDS = 30

# label -> flags; server learning rates tuned on alpha 0.1 (see the README for the sweep)
STRATEGIES: dict[str, list[str]] = {
    "FedAvg": ["--strategy=fedavg"],
    "FedAvgM": ["--strategy=fedavgm", "--server-lr=1.0", "--server-momentum=0.5"],
    "FedProx": ["--strategy=fedavg", "--mu=0.01"],
    "FedAdam": ["--strategy=fedadam", "--server-lr=0.1"],
    "FedYogi": ["--strategy=fedyogi", "--server-lr=0.1"],
    "FedAdagrad": ["--strategy=fedadagrad", "--server-lr=0.1"],
}
STRAGGLERS = ["--stragglers=0.3", "--slowdown=5", "--emulated-train-seconds=0.5"]
MODES: dict[str, tuple[int, list[str]]] = {
    "sync FedAvg": (20, ["--strategy=fedavg"]),
    "async FedBuff": (60, ["--strategy=fedavg", "--mode=async", "--buffer-size=10", "--max-staleness=10", "--staleness=sqrt"]),
}


def simulate(flags: list[str], alpha: float, rounds: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="bench-strategies-") as tmp:
        out = Path(tmp) / "run"
        command = [sys.executable, "-m", "fedge", "simulate", "--agents=20", f"--rounds={rounds}", f"--alpha={alpha}", "--seed=0",
                   "--quiet", f"--out={out}", "--log-level=warning", *flags]
        for attempt in (1, 2):  # a shared machine: retry a run that failed once, say so if it fails twice
            done = subprocess.run(command, capture_output=True, stdin=subprocess.DEVNULL, text=True)
            if done.returncode == 0:
                break
            print(f"run failed (attempt {attempt}): {' '.join(flags)}: {done.stdout[-1500:]} {done.stderr[-1500:]}", file=sys.stderr)
            shutil.rmtree(out, ignore_errors=True)
        else:
            raise RuntimeError(f"simulate failed twice: {' '.join(command)}")
        report = json.loads((out / "report.json").read_text())
    rows = report["rounds"]
    accuracy = [r["accuracy"] for r in rows]
    reached = next((i for i, a in enumerate(accuracy) if a >= TARGET_ACCURACY), None)
    return {
        "flags": flags,
        "alpha": alpha,
        "rounds_run": len(rows),
        "rounds_to_target": None if reached is None else reached + 1,
        "seconds_to_target": None if reached is None else round(sum(r["seconds"] or 0.0 for r in rows[: reached + 1]), 2),
        "accuracy_at_30": round(accuracy[min(ROUNDS, len(accuracy)) - 1], 4),
        "final_accuracy": round(accuracy[-1], 4),
        "wall_seconds": round(report["wall_seconds"], 1),
    }


def fmt(value: Any) -> str:
    return "not reached" if value is None else str(value)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--alphas", default="0.1,0.5")
    parser.add_argument("--only", help="comma-separated labels to run")
    parser.add_argument("--no-async", action="store_true")
    parser.add_argument("--no-strategies", action="store_true")
    args = parser.parse_args()
    alphas = [float(a) for a in args.alphas.split(",")]
    only = set(args.only.split(",")) if args.only else None
    results: dict[str, Any] = {"target_accuracy": TARGET_ACCURACY, "strategies": [], "async": []}
    if not args.no_strategies:
        for alpha in alphas:
            for label, flags in STRATEGIES.items():
                if only is None or label in only:
                    results["strategies"].append({"strategy": label, **simulate(flags, alpha, ROUNDS)})
                    print(json.dumps(results["strategies"][-1]), file=sys.stderr, flush=True)
    if not args.no_async:
        for alpha in alphas:
            for label, (rounds, flags) in MODES.items():
                results["async"].append({"mode": label, **simulate([*flags, *STRAGGLERS], alpha, rounds)})
                print(json.dumps(results["async"][-1]), file=sys.stderr, flush=True)
    print(json.dumps(results, indent=2))
    print()
    print("| strategy | alpha | rounds to 0.90 | seconds to 0.90 | accuracy after 30 rounds |")
    print("|---|---|---|---|---|")
    for r in results["strategies"]:
        print(f"| {r['strategy']} | {r['alpha']} | {fmt(r['rounds_to_target'])} | {fmt(r['seconds_to_target'])} | {r['accuracy_at_30']:.4f} |")
    if results["async"]:
        print()
        print("30% of agents 5x slower (every agent's training emulated at 0.5 s, stragglers 2.5 s):")
        print()
        print("| mode | alpha | versions to 0.90 | wall seconds to 0.90 | versions run | final accuracy |")
        print("|---|---|---|---|---|---|")
        for r in results["async"]:
            print(f"| {r['mode']} | {r['alpha']} | {fmt(r['rounds_to_target'])} | {fmt(r['seconds_to_target'])} | "
                  f"{r['rounds_run']} | {r['final_accuracy']:.4f} |")


if __name__ == "__main__":
    main()
