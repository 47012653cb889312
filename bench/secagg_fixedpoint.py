"""What fixed point costs in accuracy: digits FedAvg in one process, float mean against the secure-aggregation path.

Each round every client trains from the global weights (the task's suggested settings, a seed per
client and round) and the server applies the sample-weighted mean delta, computed two ways from the
same deltas:
- ``float``: in float64, as the aggregator's FedAvg does;
- ``secagg:<bits>:<clip>``: each delta through ``Weighting`` (max_weight 1000) and ``FixedPoint``
  (ring of ``bits``, clipping range ``clip``), summed by the real state machines (every device masks,
  the server unmasks; the sum is exact, so what differs is clipping and rounding alone), then
  decoded and divided by the summed weight.
Clients hold Dirichlet(0.5) label-skewed shards, or the least skewed alpha that gives each of them 10
samples (5.0 for 100 clients). Both runs start from the same model and see the same deltas in round 1; after that each follows its
own model. Reported: held-out accuracy and loss after ``--rounds``, the largest |delta coordinate|
seen (what the clip must cover), the fraction clipped, and the largest per-round difference
between the two means, in the first round (the same deltas).

One process, one core for torch. Prints JSON. Run: python -m bench.secagg_fixedpoint [--quick] [--clients 20,100] [--rounds 30]
"""

from __future__ import annotations

import argparse
import json
import random
import zlib
from typing import Any

import numpy as np

from bench.secagg_crypto import Meter, run_session
from fedge_contract.secagg import ServerSession, Setup, Weighting, new_session_id
from fedge_contract.secagg.params import recommended

MAX_WEIGHT = 1000
VARIANTS = ("float", "secagg:32:8", "secagg:16:8", "secagg:32:0.5")


def _mean(variant: str, deltas: dict[str, np.ndarray], samples: dict[str, int], round_no: int) -> tuple[np.ndarray, float]:
    """(the weighted mean delta, the fraction of coordinates clipped)."""
    if variant == "float":
        total = sum(samples.values())
        return sum(d * (samples[c] / total) for c, d in deltas.items()), 0.0  # type: ignore[return-value]
    _, bits, clip = variant.split(":")
    cohort = tuple(sorted(deltas))
    rec = recommended(len(cohort))
    length = next(iter(deltas.values())).size + 1
    setup = Setup(
        fleet="bench", round=round_no, session=new_session_id(random.Random(round_no).randbytes), sender="aggregator",
        cohort=cohort, degree=rec.degree, threshold=rec.threshold, min_survivors=rec.min_survivors,
        ring_bits=int(bits), length=length, clip=float(clip),
    )
    weighting = Weighting(clip=setup.clip, max_weight=MAX_WEIGHT)
    fixed = setup.fixed_point

    def encode(client: str) -> np.ndarray:
        rng = np.random.default_rng(zlib.crc32(f"{client}:{round_no}".encode()))
        return fixed.encode(weighting.vector(deltas[client], samples[client]), rng)

    server = ServerSession(setup, now=0.0, random=random.Random(round_no).randbytes)
    outcome = run_session(setup, server, Meter(), encode, seed=round_no)
    mean, _ = weighting.mean(fixed.decode_sum(outcome.total, outcome.count))
    clipped = float(np.mean([np.mean(np.abs(d) > setup.clip) for d in deltas.values()]))
    return mean, clipped


def simulate(clients: int, rounds: int, variant: str) -> dict[str, Any]:
    import torch

    from fedge_tasks import TrainSettings, evaluate, train
    from fedge_tasks.digits import DigitsTask
    from fedge_tasks.weights import get_weights, set_weights

    torch.set_num_threads(1)
    task = DigitsTask(clients=clients, alpha=_alpha(clients))
    model = task.build_model()
    names = list(get_weights(model))
    shapes = {n: w.shape for n, w in get_weights(model).items()}
    flat = np.concatenate([w.ravel() for w in get_weights(model).values()]).astype(np.float64)
    s = task.suggested_training()
    ids = [f"agent-{i}" for i in range(clients)]
    largest, clipped, first_gap = 0.0, 0.0, None
    for round_no in range(1, rounds + 1):
        deltas, samples = {}, {}
        for client in ids:
            set_weights(model, _unflat(flat, names, shapes))
            settings = TrainSettings(epochs=int(s["local_epochs"]), batch_size=int(s["batch_size"]), lr=float(s["lr"]),
                                     seed=zlib.crc32(f"{client}:{round_no}".encode()))
            result = train(model, task.train_data(client), settings)
            local = np.concatenate([w.ravel() for w in get_weights(model).values()]).astype(np.float64)
            deltas[client], samples[client] = local - flat, result.num_samples
        largest = max(largest, max(float(np.abs(d).max()) for d in deltas.values()))
        mean, clip_share = _mean(variant, deltas, samples, round_no)
        clipped = max(clipped, clip_share)
        if round_no == 1 and variant != "float":
            first_gap = float(np.abs(mean - _mean("float", deltas, samples, round_no)[0]).max())
        flat = flat + mean
    set_weights(model, _unflat(flat, names, shapes))
    metrics = evaluate(model, task.eval_data())
    return {
        "clients": clients, "alpha": task.alpha, "rounds": rounds, "variant": variant, "accuracy": round(metrics["accuracy"], 4),
        "loss": round(metrics["loss"], 4), "largest_abs_delta": round(largest, 4), "most_clipped_fraction": clipped,
        "round1_max_abs_gap_to_float": first_gap,
    }


def _alpha(clients: int) -> float:
    """The task's Dirichlet 0.5 where it can give every client 10 samples; 1437 samples leave 100 clients 14 each,
    which only alpha 5 manages (less label skew)."""
    from fedge_tasks.digits import load_split
    from fedge_tasks.partition import dirichlet_partition

    for alpha in (0.5, 1.0, 2.0, 5.0, 10.0):
        try:
            dirichlet_partition(load_split()[1], clients, alpha, 0)
        except ValueError:
            continue
        return alpha
    raise ValueError(f"digits cannot be split across {clients} clients")


def _unflat(flat: np.ndarray, names: list[str], shapes: dict[str, tuple[int, ...]]) -> dict[str, np.ndarray]:
    out, offset = {}, 0
    for name in names:
        size = int(np.prod(shapes[name]))
        out[name] = flat[offset : offset + size].reshape(shapes[name]).astype(np.float32)
        offset += size
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", default="20,100")
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--quick", action="store_true", help="20 clients, 3 rounds")
    args = parser.parse_args()
    clients = [20] if args.quick else [int(c) for c in args.clients.split(",")]
    rounds = 3 if args.quick else args.rounds
    runs = [simulate(n, rounds, variant) for n in clients for variant in VARIANTS]
    print(json.dumps({"max_weight": MAX_WEIGHT, "runs": runs}, indent=2))


if __name__ == "__main__":
    main()
