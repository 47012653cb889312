"""Poisoning: how far 4 malicious devices out of 20 drag the model, per aggregation defence.

Digits, 20 agents, 30 rounds, lossless update codec (zstd, so compression plays no part). The
attackers use the test-only agent knob (edge_agent/attack.py): two send their delta sign-flipped
and x10, one sends it x10, one sends NaNs (always rejected by validation, so each round closes on
the 19 others: target = min = 19). Each setting is one real `fedge simulate` run (broker,
aggregator and agent processes); final accuracy is the aggregator's held-out evaluation after the
last round. A robust setting should end within 3 points of the clean run.

Prints JSON. Run: python -m bench.poisoning [--rounds 30]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ATTACKS = {"agent-0": "signflip10", "agent-1": "signflip10", "agent-2": "scale10", "agent-3": "nan"}
SETTINGS: dict[str, list[str]] = {
    "clean (no attackers, fedavg)": [],
    "fedavg": [],
    "norm bound (auto: 3 x median norm, clip)": ["--clip-norm=auto:3"],
    "trimmed mean (20% each side)": ["--aggregation=trimmed_mean", "--robust-fraction=0.2"],
    "multi-krum (f = 20%)": ["--aggregation=krum", "--robust-fraction=0.2"],
    "median": ["--aggregation=median"],
}


def run(name: str, flags: list[str], rounds: int, agents: int) -> dict[str, object]:
    attacks = [] if name.startswith("clean") else [f"--attack={k}={v}" for k, v in ATTACKS.items()]
    with tempfile.TemporaryDirectory(prefix="fedge-poison-") as tmp:
        out = Path(tmp) / "run"
        start = time.perf_counter()
        subprocess.run(
            [sys.executable, "-m", "fedge", "simulate", f"--agents={agents}", f"--rounds={rounds}", "--target=19", "--min=19",
             "--codec=zstd", f"--out={out}", "--quiet", *flags, *attacks],
            check=True, capture_output=True, stdin=subprocess.DEVNULL,
        )
        wall = time.perf_counter() - start
        report = json.loads((out / "report.json").read_text())
    accuracies = [r["accuracy"] for r in report["rounds"]]
    return {
        "setting": name,
        "flags": flags,
        "final_accuracy": round(report["totals"]["final_accuracy"], 4),
        "best_accuracy": round(max(a for a in accuracies if a is not None), 4),
        "wall_seconds": round(wall, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--agents", type=int, default=20)
    args = parser.parse_args()
    rows = [run(name, flags, args.rounds, args.agents) for name, flags in SETTINGS.items()]
    clean = rows[0]["final_accuracy"]
    for row in rows:
        row["points_below_clean"] = round(100 * (clean - row["final_accuracy"]), 2)  # type: ignore[operator]
        row["within_3_points"] = row["points_below_clean"] <= 3  # type: ignore[operator]
    print(json.dumps({"benchmark": "poisoning", "agents": args.agents, "rounds": args.rounds, "attackers": ATTACKS, "runs": rows}, indent=2))


if __name__ == "__main__":
    main()
