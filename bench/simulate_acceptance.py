"""Issue 2's acceptance run, measured: `fedge simulate --agents 20 --rounds 30` with its defaults.

Prints JSON: wall seconds from launching the command to its exit (start-up included), final
accuracy, the sum of every process's peak RSS, and bytes up/down. Run: python -m bench.simulate_acceptance
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


def run_once(agents: int, rounds: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix="fedge-bench-") as tmp:
        out = Path(tmp) / "run"
        start = time.perf_counter()
        subprocess.run(
            [sys.executable, "-m", "fedge", "simulate", f"--agents={agents}", f"--rounds={rounds}", f"--out={out}", "--quiet"],
            check=True, capture_output=True, stdin=subprocess.DEVNULL,
        )
        wall = time.perf_counter() - start
        report = json.loads((out / "report.json").read_text())
    totals = report["totals"]
    return {
        "wall_seconds": round(wall, 2),
        "final_accuracy": round(totals["final_accuracy"], 4),
        "peak_rss_mib_sum": round(totals["peak_rss_mib_sum"], 1),
        "bytes_up": totals["bytes_up"],
        "bytes_down": totals["bytes_down"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--agents", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    runs = [run_once(args.agents, args.rounds) for _ in range(args.repeat)]
    walls = [r["wall_seconds"] for r in runs]
    print(json.dumps({
        "benchmark": "simulate_acceptance",
        "agents": args.agents,
        "rounds": args.rounds,
        "runs": runs,
        "wall_seconds_median": statistics.median(walls),
        "targets": {"wall_seconds": 15, "final_accuracy": 0.93, "peak_rss_mib_sum": 1024},
    }, indent=2))


if __name__ == "__main__":
    main()
