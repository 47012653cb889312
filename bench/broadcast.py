"""Issue 16's benchmark: bytes down next to bytes up, and the broadcast chain that gets to 0.90 cheapest.

Part 1 runs federated learning in one process, without MQTT: the digits task (fedge_tasks), 20
devices, 30 rounds, Dirichlet alpha 0.5, seed 0, every device in every round, the aggregator's
FedAvg and streaming sum (aggregator.fold, aggregator.strategies). Each device trains with the
agent's own LocalTrainer (the task's suggested 3 epochs, batch 16, lr 0.5, the agent's per-round
seeds), from the model it holds, and encodes its delta with the upload chain and the agent's
error feedback (edge_agent.residuals, seeded as the agent seeds it). The aggregator decodes every
Update from its bytes. Broadcasts are either today's full GlobalModel (in float32 or a lossy
chain; no error feedback) or delta broadcasts from fedge_contract.broadcast (server-side error
feedback, devices rebuild the held model from the bytes and check its hash).

Bytes are whole messages as the broker carries them (GlobalModel / GlobalDelta / Update, envelope
included), per device. A device downloads the announcement of versions 0 .. 29 to train rounds
1 .. 30, and version 30 at the end. "To 0.90" counts up to the first round r whose new model, as
devices hold it, scores >= 0.90 on the held-out set: downloads of versions 0 .. r, uploads of
rounds 1 .. r. The ratio compares that with float32 both ways (upload none, full float32
broadcasts). Accuracy is the held model's (what devices run); the true model's is shown beside.
"v0 built" means the devices build version 0 from the task's seed and only check its hash (a
hold message); "v0 downloaded" sends it as a full keyframe.

Part 2 times the broadcast of random-walk models of 1M and 10M parameters (true model N(0, 0.05^2),
each version a step of N(0, 0.001^2) on every weight): the aggregator's encode per version (the
residual, the codec, the decode and add that advance held, the hash), a device's rebuild (decode,
add, hash), the bytes per version, the keyframe, and the worst-case catch-up bytes.

The machine is a shared 2-core box: times are medians of a few versions in one run; compare rows
of the same run. Prints JSON, then markdown tables.

Run: python -m bench.broadcast [--no-fleet] [--no-sizes] [--sizes 1e6,1e7] [--only LABEL,...]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fedge_contract import GlobalModel, TaskConfig, Update, new_update_id
from fedge_contract.broadcast import (
    DEFAULT_BROADCAST_CHAIN,
    Announcement,
    BroadcastEncoder,
    BroadcastPolicy,
    Rebuilder,
    Step,
    decode_announcement,
    task_id,
    worst_case_catch_up_bytes,
)
from fedge_contract.codecs import decode_weights, encode_weights, parse_chain
from fedge_contract.tensors import ModelSpec

UPLOAD_DEFAULT = TaskConfig().codec  # flat+topk:0.02+rice+sign
TARGET_ACCURACY = 0.90
TARGET_RATIO = 50.0
FLEET = "sim"
MAX_BYTES = 1 << 30
_NONE = parse_chain("none")


@dataclass(frozen=True)
class Setting:
    """One row: an upload chain and a way to broadcast."""

    label: str
    upload: str
    full: str | None = None  # a full GlobalModel every version in this chain (today's --global-codec)
    policy: BroadcastPolicy | None = None  # delta broadcasts
    build_v0: bool = True  # delta broadcasts: devices build version 0 themselves (a hold) or download it
    # warm-up: (chain, n): rounds 1..n upload in this chain (the task changes at round n + 1), and
    # versions 1..n are broadcast in this chain; the rest in ``upload`` / ``policy.chain``
    upload_warmup: tuple[str, int] | None = None
    broadcast_warmup: tuple[str, int] | None = None

    def upload_chain(self, round_no: int) -> str:
        if self.upload_warmup is not None and round_no <= self.upload_warmup[1]:
            return self.upload_warmup[0]
        return self.upload

    def broadcast_policy(self, version: int) -> BroadcastPolicy:
        assert self.policy is not None
        if self.broadcast_warmup is not None and 1 <= version <= self.broadcast_warmup[1]:
            return dataclasses.replace(self.policy, chain=self.broadcast_warmup[0])
        return self.policy

    @property
    def broadcast(self) -> str:
        if self.full is not None:
            return f"full {self.full}"
        assert self.policy is not None
        keyframes = f"resets {self.policy.keyframe_chain} every {self.policy.every}" if self.policy.resets else "snapshots"
        warmup = f", {self.broadcast_warmup[0]} for v1-v{self.broadcast_warmup[1]}" if self.broadcast_warmup else ""
        return f"delta {self.policy.chain} ({keyframes}, v0 {'built' if self.build_v0 else 'downloaded'}{warmup})"

    @property
    def uploads(self) -> str:
        return self.upload + (f" ({self.upload_warmup[0]} in rounds 1-{self.upload_warmup[1]})" if self.upload_warmup else "")


def delta(chain: str, **kw: Any) -> BroadcastPolicy:
    return BroadcastPolicy(chain=chain, **kw)


SETTINGS = [
    Setting("float32", "none", full="none"),  # float32 both ways: the baseline
    Setting("today", UPLOAD_DEFAULT, full="none"),  # the default upload chain, float32 broadcasts
    Setting("today-f16", UPLOAD_DEFAULT, full="f16+zstd"),  # --global-codec f16+zstd
    Setting("today-q8", UPLOAD_DEFAULT, full="q8+zstd"),
    *(Setting(f"delta:{c}", UPLOAD_DEFAULT, policy=delta(c)) for c in (
        "flat+zstd", "f16+zstd", "flat+q8+zstd", "flat+q4+zstd", "flat+topk:0.1+q8+zstd", "flat+topk:0.1+rice+q4",
        "flat+topk:0.05+rice+q4", "flat+topk:0.1+rice+sign", "flat+topk:0.05+rice+sign", "flat+topk:0.03+rice+sign",
        "flat+topk:0.02+rice+sign",
    )),
    Setting("delta-v0-downloaded", UPLOAD_DEFAULT, policy=delta(DEFAULT_BROADCAST_CHAIN), build_v0=False),
    Setting("delta-q8-resets", UPLOAD_DEFAULT, policy=delta(DEFAULT_BROADCAST_CHAIN, keyframe_chain="flat+q8+zstd", every=10, ratio=None)),
    Setting("delta-f32-uploads", "none", policy=delta("flat+q8+zstd")),
]


# ---------------------------------------------------------------- part 1: a fleet in one process


@dataclass
class Fleet:
    """The devices, the aggregator's true model, and what the broadcast side keeps."""

    setting: Setting
    agents: int
    seed: int
    alpha: float
    tmp: Path
    down: list[int] = field(default_factory=list)  # bytes of each version's announcement (per device)
    up: list[int] = field(default_factory=list)  # mean bytes of one device's update, per round
    down_data: list[int] = field(default_factory=list)  # of which tensor data
    up_data: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        from edge_agent.residuals import Residuals
        from edge_agent.trainer import LocalTrainer
        from fedge_tasks.digits import DigitsTask
        from fedge_tasks.weights import get_weights

        self.task = DigitsTask(clients=self.agents, alpha=self.alpha, seed=self.seed, init_seed=self.seed)
        self.suggested: dict[str, Any] = dict(self.task.suggested_training())  # as the aggregator's training_config
        self.announced_task: bytes | None = None  # the task id devices hold (delta announcements name it, carry it when it changes)
        self.true = get_weights(self.task.build_model())
        self.spec = ModelSpec.of(self.true)
        self.ids = [f"agent-{i}" for i in range(self.agents)]
        self.trainers = [LocalTrainer(self.task, cid, self.seed) for cid in self.ids]
        self.residuals = [Residuals(self.tmp / cid) for cid in self.ids]
        for r in self.residuals:
            r.directory.mkdir(parents=True)
        self.devices = [Rebuilder.from_build(self.spec, self.true) for _ in self.ids]
        self.encoder = BroadcastEncoder(self.spec, self.setting.policy) if self.setting.policy else None
        self.eval_model = self.task.build_model()
        self.eval_data = self.task.eval_data()
        self.steps: list[Step] = []

    def training(self, round_no: int) -> TaskConfig:
        """The task of round ``round_no`` (announced with version round_no - 1), as the aggregator's training_config."""
        return TaskConfig(**{**self.suggested, "codec": self.setting.upload_chain(round_no)})

    def announce(self, version: int, final: bool = False) -> bytes:
        """Version ``version``'s announcement, as bytes; every device applies it (and checks its hash)."""
        training = self.training(version + 1)
        inline = task_id(training) != self.announced_task  # as the Broadcaster does: the task when it changes
        self.announced_task = task_id(training)
        about = Announcement(FLEET, version + 1, 1_760_000_000.0 + 30 * version, training, self.spec.fingerprint, final, inline)
        if self.encoder is None:
            assert self.setting.full is not None
            tensors = encode_weights(self.true, parse_chain(self.setting.full), np.random.default_rng([self.seed, version]))
            payload = GlobalModel(FLEET, version, about.round, about.deadline, training, self.spec.fingerprint, tensors, final).to_bytes()
        else:
            self.encoder.policy = self.setting.broadcast_policy(version)
            if version == 0:
                step = self.encoder.begin(self.true, 0, devices_hold=self.setting.build_v0)
            else:
                step = self.encoder.advance(self.true, version)
            self.steps.append(step)
            payload = step.broadcast.message(about).to_bytes()
        for device in self.devices:
            device.accept(decode_announcement(payload, max_bytes=MAX_BYTES, fleet=FLEET))  # raises if the rebuild does not match
        self.down.append(len(payload))
        self.down_data.append(sum(len(t.data) for t in decode_announcement(payload, max_bytes=MAX_BYTES).tensors))
        return payload

    def round(self, number: int) -> None:
        """Round ``number``: every device trains from the model it holds and uploads; FedAvg steps the true model."""
        from aggregator.aggregation.fold import WeightedSum
        from aggregator.aggregation.strategies import FedAvg
        from edge_agent.agent import _CODEC_STREAM  # the agent's codec random stream, so uploads match fedge simulate
        from edge_agent.seeds import training_seed

        version = number - 1
        training = self.training(number)
        chain = parse_chain(training.codec)
        total, sizes, data = WeightedSum(self.spec), [], []
        for cid, trainer, residuals, device in zip(self.ids, self.trainers, self.residuals, self.devices, strict=True):
            assert device.held is not None and device.held.version == version
            start = GlobalModel(FLEET, version, number, None, training, self.spec.fingerprint,
                                encode_weights(device.held.weights, _NONE))  # the held model, as the trainer takes it
            local = trainer.run(start, lambda: True)
            assert local is not None
            rng = np.random.default_rng([training_seed(self.seed, cid, number), _CODEC_STREAM])
            tensors, residual = residuals.encode(local.delta, chain, self.spec, rng)
            if residual is not None:
                residuals.save(self.spec, residual)
            result = local.result
            payload = Update(FLEET, cid, new_update_id(), number, version, result.num_samples, tensors,
                             metrics={"loss": result.loss, "accuracy": result.accuracy, "train_seconds": result.seconds}
                             ).to_bytes(compact=training.update_form == "compact")  # as the agent picks the form
            sizes.append(len(payload))
            data.append(sum(len(t.data) for t in tensors))
            update = Update.from_bytes(payload, max_bytes=MAX_BYTES, fleet=FLEET)
            total.add(decode_weights(update.tensors, self.spec), float(update.num_samples))
        self.true = FedAvg().apply(self.true, total.mean())
        self.up.append(round(statistics.fmean(sizes)))
        self.up_data.append(round(statistics.fmean(data)))

    def accuracy(self, weights: Any) -> float:
        from fedge_tasks import evaluate
        from fedge_tasks.weights import set_weights

        set_weights(self.eval_model, weights)
        return float(evaluate(self.eval_model, self.eval_data)["accuracy"])

    def held(self) -> Any:
        held = self.devices[0].held
        assert held is not None
        return held.weights


def federated_run(setting: Setting, agents: int, rounds: int, seed: int, alpha: float) -> dict[str, Any]:
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="fedge-bench-broadcast-") as tmp:
        fleet = Fleet(setting, agents, seed, alpha, Path(tmp))
        fleet.announce(0)
        held_acc, true_acc = [], []
        for number in range(1, rounds + 1):
            fleet.round(number)
            fleet.announce(number, final=number == rounds)
            held_acc.append(fleet.accuracy(fleet.held()))
            true_acc.append(fleet.accuracy(fleet.true))
    reached = next((r for r, a in enumerate(held_acc, start=1) if a >= TARGET_ACCURACY), None)
    row: dict[str, Any] = {
        "label": setting.label, "upload": setting.uploads, "broadcast": setting.broadcast,
        "final_accuracy": round(held_acc[-1], 4), "final_accuracy_true_model": round(true_acc[-1], 4),
        "round_to_090": reached,
        "bytes_per_device": {"up": sum(fleet.up), "down": sum(fleet.down), "total": sum(fleet.up) + sum(fleet.down)},
        "down_per_version": {"v0": fleet.down[0], "mean_after_v0": round(statistics.fmean(fleet.down[1:])), "max": max(fleet.down)},
        "up_per_round_mean": round(statistics.fmean(fleet.up)),
        "accuracy_by_round": [round(a, 4) for a in held_acc],
        "seconds": round(time.perf_counter() - started, 1),
    }
    if reached is not None:
        up, down = sum(fleet.up[:reached]), sum(fleet.down[: reached + 1])
        row["bytes_to_090"] = {"up": up, "down": down, "total": up + down}
        # where they go: tensor data (the codec's output) and envelope (everything else in the message)
        up_data, down_data = sum(fleet.up_data[:reached]), sum(fleet.down_data[: reached + 1])
        row["bytes_to_090_split"] = {"up_data": up_data, "up_envelope": up - up_data, "down_data": down_data, "down_envelope": down - down_data}
    if fleet.encoder is not None:
        row["catch_up"] = catch_up_bytes(fleet)
    return row


def catch_up_bytes(fleet: Fleet) -> dict[str, Any]:
    """What a device that holds nothing downloads at the end (keyframe and retained deltas), against the bound."""
    assert fleet.encoder is not None and fleet.setting.policy is not None
    about = Announcement(FLEET, 0, None, fleet.training(0), fleet.spec.fingerprint, inline_task=False)  # retained copies name the task
    keyframe = fleet.encoder.keyframe
    messages = [(len(keyframe.message(about).to_bytes()), keyframe.nbytes)]
    messages += [(len(b.message(about).to_bytes()), b.nbytes) for b in fleet.encoder.retained]
    envelope = max(size - data for size, data in [*messages, *envelopes(fleet.steps, about)])
    largest = max(s.broadcast.nbytes for s in fleet.steps if s.broadcast.kind == "delta")
    return {
        "keyframe_bytes": messages[0][0], "retained_deltas": len(messages) - 1, "now_bytes": sum(size for size, _ in messages),
        "worst_case_bytes": worst_case_catch_up_bytes(keyframe.nbytes, largest, fleet.setting.policy, envelope),
        "envelope_bytes": envelope, "keyframes_taken": sum(1 for s in fleet.steps if s.keyframe is not None),
    }


def envelopes(steps: list[Step], about: Announcement) -> list[tuple[int, int]]:
    return [(len(s.broadcast.message(about).to_bytes()), s.broadcast.nbytes) for s in steps]


def compare(rows: list[dict[str, Any]]) -> None:
    base = rows[0]
    assert base["label"] == "float32"
    for row in rows:
        reach, base_reach = row.get("bytes_to_090"), base.get("bytes_to_090")
        row["ratio_to_090"] = round(base_reach["total"] / reach["total"], 1) if reach and base_reach else None
        row["ratio_30_rounds"] = round(base["bytes_per_device"]["total"] / row["bytes_per_device"]["total"], 1)
        row["accuracy_gap"] = round(base["final_accuracy"] - row["final_accuracy"], 4)
        row["meets_goal"] = bool(row["ratio_to_090"] and row["ratio_to_090"] >= TARGET_RATIO and row["accuracy_gap"] <= 0.01)


# ---------------------------------------------------------------- part 2: 1M and 10M parameters

SIZE_CHAINS = ["f16+zstd", "flat+q8+zstd", "flat+q4+zstd", "flat+topk:0.1+q8+zstd", "flat+topk:0.05+q4+zstd", "flat+topk:0.05+rice+sign",
               "flat+topk:0.01+q4+zstd"]


def layered(parameters: int, rng: np.random.Generator, scale: float) -> dict[str, np.ndarray]:
    side = 1024
    rows, rest = divmod(parameters, side)
    weights = {"layer.weight": rng.standard_normal((rows, side), dtype=np.float32) * np.float32(scale)}
    if rest:
        weights["layer.bias"] = rng.standard_normal(rest, dtype=np.float32) * np.float32(scale)
    return weights


def timed(fn: Any) -> tuple[Any, float]:
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def size_row(parameters: int, chain: str, versions: int) -> dict[str, Any]:
    rng = np.random.default_rng(1)
    true = layered(parameters, rng, 0.05)
    spec = ModelSpec.of(true)
    about = Announcement(FLEET, 1, 1_760_000_000.0, TaskConfig(), spec.fingerprint)
    policy = BroadcastPolicy(chain=chain, every=1000, ratio=None)  # no keyframes in the timed versions
    encoder, device = BroadcastEncoder(spec, policy), Rebuilder.from_build(spec, true)
    begun, begin_s = timed(lambda: encoder.begin(true, 0, devices_hold=True))
    encode_s, rebuild_s, sizes = [], [], []
    for version in range(1, versions + 1):
        for values in true.values():
            values += rng.standard_normal(values.shape, dtype=np.float32) * np.float32(1e-3)
        step, seconds = timed(lambda: encoder.advance(true, version))  # noqa: B023 - called at once
        payload = step.broadcast.message(about).to_bytes()
        message = decode_announcement(payload, max_bytes=MAX_BYTES)
        _, rebuild = timed(lambda: device.accept(message))  # noqa: B023
        encode_s.append(seconds)
        rebuild_s.append(rebuild)
        sizes.append(len(payload))
    assert device.held is not None and device.held.digest == encoder.held_hash
    keyframe = len(begun.keyframe.message(about).to_bytes())
    envelope = max(keyframe - begun.keyframe.nbytes, max(sizes) - step.broadcast.nbytes)
    return {
        "parameters": parameters, "chain": chain, "float32_model_bytes": spec.nbytes,
        "bytes_per_version": round(statistics.median(sizes)), "ratio_to_float32": round(spec.nbytes / statistics.median(sizes), 1),
        "encode_seconds": round(statistics.median(encode_s[1:] or encode_s), 3),  # the first pays page faults
        "device_rebuild_seconds": round(statistics.median(rebuild_s[1:] or rebuild_s), 3),
        "keyframe_bytes": keyframe, "keyframe_seconds": round(begin_s, 3),
        "worst_case_catch_up_bytes": {
            f"every {k}, ratio {r}": worst_case_catch_up_bytes(
                begun.keyframe.nbytes, step.broadcast.nbytes, BroadcastPolicy(chain=chain, every=k, ratio=r), envelope)
            for k, r in ((30, 0.5), (30, None), (10, None))
        },
    }


# ---------------------------------------------------------------- output


def fmt_bytes(value: int | None) -> str:
    return "-" if value is None else f"{value:,}"


def markdown(result: dict[str, Any]) -> str:
    lines: list[str] = []
    if result.get("fleet"):
        lines += [
            ("| upload / broadcast | final acc (true) | round to 0.90 | up to 0.90 | down to 0.90 | total to 0.90 | vs float32 | "
             "down/version | 30 rounds total | catch-up now / worst |"),
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in result["fleet"]:
            reach = r.get("bytes_to_090") or {}
            ratio = f"{r['ratio_to_090']:.1f}x" if r["ratio_to_090"] else "-"
            catch = r.get("catch_up")
            catch_text = f"{catch['now_bytes']:,} / {catch['worst_case_bytes']:,}" if catch else "-"
            lines.append(
                f"| `{r['upload']}` / {r['broadcast']} | {r['final_accuracy']:.3f} ({r['final_accuracy_true_model']:.3f}) | "
                f"{r['round_to_090'] or '-'} | {fmt_bytes(reach.get('up'))} | {fmt_bytes(reach.get('down'))} | "
                f"{fmt_bytes(reach.get('total'))} | {ratio} | {r['down_per_version']['mean_after_v0']:,} | "
                f"{r['bytes_per_device']['total']:,} | {catch_text} |"
            )
    if result.get("sizes"):
        lines += [
            "",
            "| params | chain | bytes/version | vs float32 | encode s | device rebuild s | keyframe bytes | worst catch-up (K=30, ratio 0.5) |",
            "|---:|---|---:|---:|---:|---:|---:|---:|",
        ]
        for r in result["sizes"]:
            lines.append(
                f"| {r['parameters']:,} | `{r['chain']}` | {r['bytes_per_version']:,} | {r['ratio_to_float32']:.1f}x | "
                f"{r['encode_seconds']:.3f} | {r['device_rebuild_seconds']:.3f} | {r['keyframe_bytes']:,} | "
                f"{r['worst_case_catch_up_bytes']['every 30, ratio 0.5']:,} |"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--no-fleet", action="store_true", help="skip the federated runs")
    parser.add_argument("--no-sizes", action="store_true", help="skip the 1M/10M timings")
    parser.add_argument("--sizes", default="1e6,1e7")
    parser.add_argument("--versions", type=int, default=4, help="timed versions per size and chain")
    parser.add_argument("--only", help="comma-separated labels of the federated runs (the float32 baseline always runs)")
    parser.add_argument("--agents", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--alpha", type=float, default=0.5)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    result: dict[str, Any] = {"target_accuracy": TARGET_ACCURACY, "target_ratio": TARGET_RATIO}
    if not args.no_fleet:
        only = set(args.only.split(",")) if args.only else None
        chosen = [s for s in SETTINGS if only is None or s.label in only or s is SETTINGS[0]]
        rows = []
        for setting in chosen:
            rows.append(federated_run(setting, args.agents, args.rounds, args.seed, args.alpha))
            print(json.dumps({k: v for k, v in rows[-1].items() if k != "accuracy_by_round"}), file=sys.stderr, flush=True)
        compare(rows)
        result["fleet"] = rows
        result["meeting_goal"] = [r["label"] for r in rows if r["meets_goal"]]
    if not args.no_sizes:
        result["sizes"] = []
        for parameters in (int(float(s)) for s in args.sizes.split(",") if s):
            for chain in SIZE_CHAINS:
                result["sizes"].append(size_row(parameters, chain, args.versions))
                print(json.dumps(result["sizes"][-1]), file=sys.stderr, flush=True)
    print(json.dumps(result, indent=2))
    print()
    print(markdown(result))


if __name__ == "__main__":
    main()
