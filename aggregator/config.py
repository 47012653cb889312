"""The aggregator's one configuration: a tree of small frozen dataclasses, loaded like the agent's.

The tree is the schema and its defaults are the only defaults; fedge_runtime/settings.py fills
it from flags > ``FEDGE_*`` environment > a TOML file (``fedge aggregator --config FILE``) > the
defaults, and generates the flags from the fields' metadata. A TOML file::

    broker = "mqtts://aggregator:secret@hub.local:8883"
    fleet = "kitchen"
    task = "digits"
    store = "/var/lib/fedge/aggregator.sqlite"
    [rounds]
    rounds = 100
    target = 20
    min_updates = 10
    deadline = 300
    [training]
    codec = "flat+topk:0.02+rice+sign"
    [defence]
    clip_norm = "auto:3"
    [broadcast]
    chain = "flat+topk:0.05+q4+zstd"
    [monitoring]
    metrics_port = 9100

Environment: ``FEDGE_<KEY>`` for a top-level key, ``FEDGE_<SECTION>_<KEY>`` in a section
(``FEDGE_ROUNDS_TARGET``). Sections: ``rounds`` (round mode, target, deadline; FedBuff's buffer;
secure aggregation on or off), ``secagg`` (secure aggregation's phase deadlines, threshold, retries),
``training`` (what agents are told to do, over the task's suggestion), ``strategy`` (the server
optimiser), ``defence`` (hostile updates: allowlist, caps, norm bound, robust rule, DP), ``ingest``
(limits, durability, chunking, worker processes), ``broadcast`` (how each version reaches devices:
delta broadcasts and their keyframes) and ``monitoring`` (Prometheus, dashboard).

Each dataclass validates its own fields; ``AggregatorConfig`` checks the combinations (what
ingest workers or differential privacy cannot be combined with).
"""

from __future__ import annotations

import dataclasses
import math
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aggregator.aggregation.clipping import CLIP_ACTIONS
from aggregator.aggregation.privacy import PrivacyParams
from aggregator.aggregation.robust import AGGREGATIONS
from aggregator.aggregation.strategies import STRATEGIES, StrategyConfig
from aggregator.rounds.buffered import BufferPlan, staleness_function
from aggregator.rounds.cohort import CohortPolicy
from aggregator.rounds.sync import RoundPlan
from fedge_contract.broadcast import DEFAULT_BROADCAST_CHAIN, BroadcastPolicy
from fedge_contract.broadcast.policy import SNAPSHOT_CHAIN
from fedge_contract.chunks import DEFAULT_MAX_MESSAGE_BYTES, MIN_MESSAGE_BYTES
from fedge_contract.codecs import parse_chain
from fedge_contract.mqtt import MAX_RETURN_DELAY, BrokerAddress
from fedge_contract.topics import check_name
from fedge_runtime.settings import Loader, Merged, SettingsError, convert

__all__ = [
    "LOADER", "AggregatorConfig", "BroadcastSettings", "ClipNorm", "DefenceSettings", "IngestSettings", "MonitoringSettings",
    "RoundSettings", "SecureSettings", "TrainingSettings", "build", "config_of",
]

DURABILITY = ("disk", "process")
MODES = ("sync", "async")
_CODE_ONLY = {"setting": False}  # set by code (tests, the simulation), never by a user's settings


@dataclass(frozen=True)
class RoundSettings:
    """How rounds run: synchronous rounds with a deadline (default) or FedBuff's buffer (``mode = "async"``)."""

    rounds: int = field(default=30, metadata={"help": "model versions to produce, then publish the final model and exit (0 = forever)"})
    target: int = field(default=10, metadata={"help": "updates that close a round early"})
    min_updates: int = field(default=1, metadata={"flag": "--min", "help": "updates needed to close a round at its deadline"})
    deadline: float = field(default=60.0, metadata={"help": "seconds a round stays open before closing or extending"})
    mode: str = field(default="sync", metadata={"help": "sync: rounds with deadlines; async: FedBuff (buffered asynchronous aggregation)"})
    buffer_size: int = field(default=10, metadata={"help": "async: accepted updates per new model version"})
    max_staleness: int = field(default=10, metadata={"help": "async: oldest base version accepted, in versions behind the newest"})
    staleness: str = field(default="sqrt", metadata={"help": "async: staleness weight: sqrt (1/sqrt(1+s)), constant, poly:<a>"})
    # A round resumed after a restart, or re-announced after a broker reconnect, stays open at least
    # this long: devices that were cut off need their reconnect backoff to come back and resend.
    resend_grace: float = field(default=MAX_RETURN_DELAY, metadata={
        "help": "seconds a resumed or re-announced round stays open at least, for devices reconnecting "
                "(default: the longest the agents' reconnect schedule takes)"})
    # Issue 17 (aggregator/rounds/secure.py): the aggregator learns each round's sum and nothing about a single
    # device's delta; the protocol's own settings are in [secagg].
    secure_aggregation: bool = field(default=False, metadata={
        "action": "store_true", "show_default": False,
        "help": "sync: secure aggregation (SecAgg+): devices send masked inputs and the aggregator learns only the cohort's "
                "sum; needs --aggregation mean, the update codec none, a fixed --clip-norm if any (see [secagg])"})

    # Cohort selection (issue 15, rounds/cohort.py): each sync round invites ceil(target x over_select)
    # devices; 0 turns it off (every device trains, as before cohorts).
    over_select: float = field(default=1.3, metadata={
        "help": "sync: invite ceil(target x this) devices per round, chosen from the eligible ones fairly over time; "
                "0: no cohort, every device trains"})
    seed: int = field(default=0, metadata={"flag": "--cohort-seed", "help": "seed of the cohort selection (the same seed, the same cohorts)"})
    checkin: float = field(default=10.0, metadata={
        "help": "with a cohort: seconds a round waits at most for enough eligible devices to check in before it selects from those present"})
    eval_every: int = field(default=0, metadata={
        "metavar": "N", "help": "ask devices to evaluate every N-th model version (and the final one) on their own held-out data; 0: never"})
    eval_fraction: float = field(default=0.1, metadata={"help": "share of the devices asked to evaluate (a uniform hash rule)"})

    def __post_init__(self) -> None:
        if self.rounds < 0:
            raise ValueError("rounds must be >= 0 (0 = run forever)")
        if not (self.over_select == 0 or 1 <= self.over_select <= 100):
            raise ValueError(f"over_select must be 0 (no cohort) or in [1, 100], got {self.over_select}")
        if not self.checkin >= 0:
            raise ValueError(f"checkin must be >= 0, got {self.checkin}")
        if self.eval_every < 0 or not 0 < self.eval_fraction <= 1:
            raise ValueError(f"need eval_every >= 0 and 0 < eval_fraction <= 1, got {self.eval_every} and {self.eval_fraction}")
        if self.mode not in MODES:
            raise ValueError(f"mode must be sync or async, got {self.mode!r}")
        if not self.resend_grace >= 0:
            raise ValueError(f"resend_grace must be >= 0, got {self.resend_grace}")
        _ = self.plan, self.buffer_plan  # each validates its numbers
        staleness_function(self.staleness)

    @property
    def plan(self) -> RoundPlan:
        return RoundPlan(target=self.target, min_updates=self.min_updates, timeout=self.deadline)

    @property
    def buffer_plan(self) -> BufferPlan:
        return BufferPlan(target=self.buffer_size, max_staleness=self.max_staleness)

    @property
    def cohort(self) -> CohortPolicy | None:
        """The cohort selection of sync rounds (None: every device trains; async mode never selects)."""
        if self.mode != "sync" or self.over_select == 0:
            return None
        return CohortPolicy(target=self.target, over_select=self.over_select, seed=self.seed)

    @property
    def per_round(self) -> int:
        """Updates that make one model version: the target, or in async mode the buffer size."""
        return self.buffer_size if self.mode == "async" else self.target


@dataclass(frozen=True)
class SecureSettings:
    """Secure aggregation's protocol (``[rounds] secure_aggregation``; fedge_contract/secagg/DESIGN.md): phase
    deadlines, the neighbourhood and threshold (None: recommended for the cohort's size), retries, the fixed point."""

    advertise_timeout: float = field(default=30.0, metadata={
        "flag": "--secagg-advertise-timeout", "metavar": "SECONDS", "help": "seconds invited devices get to advertise their keys"})
    share_timeout: float = field(default=30.0, metadata={
        "flag": "--secagg-share-timeout", "metavar": "SECONDS", "help": "seconds devices get to send their sealed shares"})
    mask_timeout: float | None = field(default=None, metadata={
        "flag": "--secagg-mask-timeout", "metavar": "SECONDS",
        "help": "seconds devices get to train and send their masked input (default: the round's --deadline)"})
    unmask_timeout: float = field(default=30.0, metadata={
        "flag": "--secagg-unmask-timeout", "metavar": "SECONDS", "help": "seconds survivors get to reveal their shares"})
    degree: int | None = field(default=None, metadata={
        "flag": "--secagg-degree", "help": "neighbours per device, even (default 2 x ceil(2 log2 n) for a cohort of n)"})
    threshold: int | None = field(default=None, metadata={
        "flag": "--secagg-threshold",
        "help": "shares that rebuild a device's secret (default ceil(0.4 x degree); devices refuse less than 40% of their neighbours)"})
    min_survivors: int | None = field(default=None, metadata={
        "flag": "--secagg-min-survivors", "help": "fewest inputs a revealed sum may hold (default: max(3, threshold, --min))"})
    retries: int = field(default=2, metadata={
        "flag": "--secagg-retries", "help": "new sessions a round tries after an abandoned one before it is extended and re-announced"})
    clip: float = field(default=8.0, metadata={
        "flag": "--secagg-clip", "help": "fixed point: each coordinate of a delta is clipped to [-CLIP, CLIP]"})
    ring_bits: int = field(default=32, metadata={
        "flag": "--secagg-ring-bits", "metavar": "BITS", "help": "fixed point: bits of each summed coordinate (4 bytes at 32)"})

    def __post_init__(self) -> None:
        timeouts = (self.advertise_timeout, self.share_timeout, self.unmask_timeout, 1.0 if self.mask_timeout is None else self.mask_timeout)
        if not all(t > 0 and math.isfinite(t) for t in timeouts):
            raise ValueError("secagg timeouts must be positive numbers of seconds")
        if self.degree is not None and (self.degree < 2 or self.degree % 2):
            raise ValueError(f"secagg degree must be even and >= 2, got {self.degree}")
        if self.threshold is not None and (self.threshold < 2 or (self.degree is not None and self.threshold > self.degree)):
            raise ValueError(f"secagg threshold must be in 2..degree, got {self.threshold}")
        if self.min_survivors is not None and self.min_survivors < 3:
            raise ValueError(f"secagg min_survivors must be >= 3 (a sum of two tells each device the other's input), got {self.min_survivors}")
        if self.retries < 0:
            raise ValueError(f"secagg retries must be >= 0, got {self.retries}")
        if not (self.clip > 0 and math.isfinite(self.clip)) or not 8 <= self.ring_bits <= 64:
            raise ValueError(f"secagg clip must be > 0 and ring_bits in 8..64, got {self.clip} and {self.ring_bits}")


@dataclass(frozen=True)
class TrainingSettings:
    """What agents are told to do each round; None: the task's suggestion (``suggested_training``)."""

    local_epochs: int | None = field(default=None, metadata={"help": "epochs over the device's data per round"})
    batch_size: int | None = None
    lr: float | None = field(default=None, metadata={"help": "local SGD learning rate"})
    momentum: float | None = None
    mu: float | None = field(default=None, metadata={"help": "FedProx proximal weight (0 = FedAvg)"})
    # Not ``str | None``: "none" is a chain (raw float32), so the empty string means "not set".
    codec: str = field(default="", metadata={
        "show_default": False,
        "help": "update codec chain agents must use, e.g. flat+topk:0.02+rice+sign (the default), q8+zstd, f16+zstd, zstd, none"})

    def __post_init__(self) -> None:
        if self.codec:
            parse_chain(self.codec)

    def overrides(self) -> dict[str, Any]:
        """The TaskConfig fields set here (the rest come from the task's suggestion)."""
        return {f.name: value for f in dataclasses.fields(self) if (value := getattr(self, f.name)) is not None and value != ""}


@dataclass(frozen=True)
class ClipNorm:
    """A norm bound as the user writes it: a number (a fixed bound), ``auto`` or ``auto:FACTOR``
    (FACTOR, default 3, times the median norm of recent accepted updates)."""

    bound: float | None = None
    factor: float | None = None

    def __post_init__(self) -> None:
        if (self.bound is None) == (self.factor is None):
            raise ValueError("a norm bound is either a number or auto[:FACTOR]")
        value = self.bound if self.bound is not None else self.factor
        if not (value is not None and value > 0 and math.isfinite(value)):
            raise ValueError(f"a norm bound must be a positive number or auto:FACTOR with FACTOR > 0, got {value}")

    @classmethod
    def parse(cls, text: str) -> ClipNorm:
        word, _, factor = text.strip().partition(":")
        try:
            if word == "auto":
                return cls(factor=float(factor) if factor else 3.0)
            if not factor:
                return cls(bound=float(word))
        except ValueError:
            pass
        raise ValueError(f"use a number, auto or auto:FACTOR, got {text!r}")

    def __str__(self) -> str:
        return f"auto:{self.factor:g}" if self.factor is not None else f"{self.bound:g}"


def _read_client_list(path: Path) -> frozenset[str]:
    """One client id per line; blank lines and lines starting with # are skipped."""
    try:
        lines = path.read_text().splitlines()
    except OSError as exc:
        raise ValueError(f"cannot read the client allowlist {path}: {exc.strerror or exc}") from None
    return frozenset(line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#"))


@dataclass(frozen=True)
class DefenceSettings:
    """Hostile updates (aggregator/aggregation/): allowlist, weight cap, norm bound, robust rule, client-level DP."""

    allow_clients: Path | None = field(default=None, metadata={
        "metavar": "FILE", "help": "only accept updates from the client ids in FILE (one per line)"})
    max_num_samples: int = field(default=10_000_000, metadata={"help": "reject updates claiming more samples"})
    max_weight: int | None = field(default=None, metadata={"help": "cap an update's weight (its num_samples) at this"})
    clip_norm: ClipNorm | None = field(default=None, metadata={
        "parse": ClipNorm.parse, "metavar": "BOUND|auto[:FACTOR]",
        "help": "bound each update's L2 norm: a number, or auto = FACTOR (default 3) x median of recent norms"})
    clip_action: str = field(default="clip", metadata={"help": "beyond the bound: scale back (clip) or reject"})
    aggregation: str = field(default="mean", metadata={"help": "mean, median, trimmed_mean or krum (multi-Krum)"})
    robust_fraction: float = field(default=0.2, metadata={"help": "share of each round's updates assumed malicious (trimmed mean, Krum)"})
    dp_noise: float | None = field(default=None, metadata={
        "metavar": "Z", "help": "client-level DP: Gaussian noise std = Z x --clip-norm per round"})
    dp_delta: float = field(default=1e-5, metadata={"help": "DP delta"})
    dp_population: int | None = field(default=None, metadata={
        "help": "devices in the fleet; sampling rate = target / population (default: rate 1)"})
    dp_seed: int | None = field(default=None, metadata=_CODE_ONLY)  # tests only: DP noise from a seeded generator
    allowed_clients: frozenset[str] | None = field(default=None, metadata=_CODE_ONLY)  # the allowlist itself (read from the file)

    def __post_init__(self) -> None:
        if self.allow_clients is not None and self.allowed_clients is None:
            object.__setattr__(self, "allowed_clients", _read_client_list(self.allow_clients))
        if self.allowed_clients is not None:
            for client in self.allowed_clients:
                check_name("client id", client)
        if self.aggregation not in AGGREGATIONS:
            raise ValueError(f"unknown aggregation {self.aggregation!r} (known: {', '.join(AGGREGATIONS)})")
        if not 0 <= self.robust_fraction < 0.5:
            raise ValueError(f"robust_fraction must be in [0, 0.5), got {self.robust_fraction}")
        if self.max_num_samples < 1 or (self.max_weight is not None and self.max_weight < 1):
            raise ValueError("max_num_samples and max_weight must be >= 1")
        if self.clip_action not in CLIP_ACTIONS:
            raise ValueError(f"clip_action must be one of {', '.join(CLIP_ACTIONS)}, got {self.clip_action!r}")

    @property
    def bound(self) -> float | None:
        """The fixed norm bound, if any (with ``factor``: the warm-up bound of an adaptive one)."""
        return self.clip_norm.bound if self.clip_norm else None

    @property
    def factor(self) -> float | None:
        """The adaptive bound's factor, if the bound is ``auto``."""
        return self.clip_norm.factor if self.clip_norm else None


@dataclass(frozen=True)
class IngestSettings:
    """How updates come in: limits, durability, chunking, and the processes that decode them."""

    max_update_bytes: int | None = field(default=None, metadata={"help": "largest update accepted (default: 1.25x the float32 model)"})
    # A global model above this goes out in chunks with a manifest (fedge_contract/chunks.py); agents
    # chunk their updates by their own setting. Keep it a few KiB below the broker's max_packet_size.
    max_message_bytes: int = field(default=DEFAULT_MAX_MESSAGE_BYTES, metadata={
        "metavar": "BYTES", "help": "a global model above this is published in chunks with a manifest (keep it below the broker's max_packet_size)"})
    # "disk": a receipt leaves only once its update is fsync'd (survives a power cut); "process":
    # written in order but never fsync'd (survives a crash of the aggregator, not of the host).
    durability: str = field(default="disk", metadata={
        "help": "disk: an update is fsync'd before its receipt (a power cut loses no receipted update); process: written in order "
                "but not fsync'd (survives a crash of the aggregator, not of the host; faster on slow disks)"})
    workers: int = field(default=0, metadata={
        "metavar": "N", "help": "ingest updates in N worker processes on a shared subscription (sync mode, mean aggregation); "
                               "0: this process ingests"})
    # Updates waiting in memory before the connection stops reading (TCP backpressure, see
    # fedge_contract.mqtt): a flood waits in the broker, so memory is O(model), not O(updates).
    inbox_limit: int = field(default=8, metadata=_CODE_ONLY)
    chunk_timeout: float = field(default=60.0, metadata=_CODE_ONLY)  # seconds without a new chunk before a partial chunked update is refused

    def __post_init__(self) -> None:
        if self.durability not in DURABILITY:
            raise ValueError(f"durability must be one of {', '.join(DURABILITY)}, got {self.durability!r}")
        if self.inbox_limit < 2:
            raise ValueError(f"inbox_limit must be >= 2, got {self.inbox_limit}")
        if self.max_message_bytes < MIN_MESSAGE_BYTES or not self.chunk_timeout > 0:
            raise ValueError(f"max_message_bytes must be >= {MIN_MESSAGE_BYTES} and chunk_timeout > 0")
        if self.workers < 0:
            raise ValueError(f"workers must be >= 0, got {self.workers}")


@dataclass(frozen=True)
class BroadcastSettings:
    """How each new model version reaches devices (issue 16; README: delta broadcasts).

    On (the default): a delta from the version devices hold, in ``chain``, with server-side error
    feedback, plus the retained keyframe and deltas a device catches up from. Off: the whole model
    every version, in ``global_codec`` (for agents that predate delta broadcasts).
    """

    # On by default: bench/codecs (digits, 20 devices, 30 rounds) measured 922 bytes per version
    # instead of 38,889, ~33x fewer bytes both ways to 0.90 instead of 1.2x (README: delta broadcasts).
    deltas: bool = field(default=True, metadata={
        "flag": "--delta-broadcasts",
        "help": "broadcast each version as a delta from the model devices hold (with server-side error feedback); "
                "--no-delta-broadcasts: the whole model every version, in --global-codec (agents older than delta broadcasts)"})
    chain: str = field(default=DEFAULT_BROADCAST_CHAIN, metadata={
        "flag": "--broadcast-chain", "help": "codec chain of the broadcast deltas (any chain updates may use)"})
    keyframe_chain: str = field(default=SNAPSHOT_CHAIN, metadata={
        "flag": "--keyframe-chain",
        "help": "codec of keyframes: lossless (flat+zstd, zstd, none) = snapshots only catching-up devices download; "
                "lossy (flat+q8+zstd, f16+zstd) = resets every device downloads"})
    every: int = field(default=BroadcastPolicy.every, metadata={
        "flag": "--keyframe-every", "metavar": "K", "help": "a keyframe at least every K versions"})
    ratio: float | None = field(default=BroadcastPolicy.ratio, metadata={
        "flag": "--keyframe-ratio",
        "help": "a keyframe sooner, once the deltas retained since the last one weigh this times the keyframe (none: only every K)"})

    def __post_init__(self) -> None:
        _ = self.policy  # validates the chains and numbers

    @property
    def policy(self) -> BroadcastPolicy:
        return BroadcastPolicy(chain=self.chain, keyframe_chain=self.keyframe_chain, every=self.every, ratio=self.ratio)


@dataclass(frozen=True)
class MonitoringSettings:
    """What the aggregator serves besides MQTT (off unless a port is set)."""

    metrics_port: int | None = field(default=None, metadata={
        "metavar": "PORT", "help": "serve Prometheus metrics on http://HOST:PORT/metrics (0: a free port)"})
    metrics_host: str = field(default="127.0.0.1", metadata={"help": "address the metrics server and dashboard listen on (0.0.0.0: all)"})
    dashboard_port: int | None = field(default=None, metadata={"metavar": "PORT", "help": "serve the web dashboard on http://HOST:PORT/"})

    def __post_init__(self) -> None:
        if self.dashboard_port and self.dashboard_port == self.metrics_port:
            raise ValueError("the dashboard and the metrics need different ports")


@dataclass(frozen=True)
class AggregatorConfig:
    broker: BrokerAddress = field(metadata={"help": "mqtt://[user:password@]host:port or mqtts://...", "parse": BrokerAddress.parse})
    ca_file: str | None = field(default=None, metadata={"help": "CA certificate for mqtts://"})
    cert_file: str | None = field(default=None, metadata={"help": "client certificate for a broker that requires one"})
    key_file: str | None = field(default=None, metadata={"help": "the client certificate's private key (with --cert-file)"})
    fleet: str = field(default="default", metadata={"help": "the fleet (federation) this aggregator runs"})
    task: str = field(default="digits", metadata={"help": "MODULE:OBJECT of a fedge task, or a built-in name (digits, synthetic)"})
    task_options: Mapping[str, str] = field(default_factory=dict, metadata={"flag": "--task-opt", "help": "option passed to the task (repeatable)"})
    store: Path = field(default=Path("fedge-aggregator.sqlite"), metadata={"help": "SQLite store (checkpoints, rounds, the spool)"})
    global_codec: str = field(default="none", metadata={
        "help": "codec of the whole model broadcast every version without delta broadcasts (--no-delta-broadcasts), e.g. f16+zstd"})
    evaluate: bool = field(default=True, metadata={
        "flag": "--no-eval", "action": "store_false", "show_default": False,
        "help": "skip evaluating each model on the task's held-out data"})
    client_id: str | None = field(default=None, metadata=_CODE_ONLY)  # MQTT client id; default fedge-aggregator-<fleet>
    session_expiry: int = field(default=24 * 3600, metadata=_CODE_ONLY)  # seconds the broker queues updates while the aggregator is away
    rounds: RoundSettings = field(default_factory=RoundSettings, metadata={"help": "rounds"})
    training: TrainingSettings = field(default_factory=TrainingSettings, metadata={
        "help": "local training (sent to agents each round; default: the task's suggestion)"})
    strategy: StrategyConfig = field(default_factory=StrategyConfig, metadata={
        "help": "server optimiser (fedavg, fedavgm, fedadam, fedyogi, fedadagrad; FedProx = fedavg with --mu)"})
    defence: DefenceSettings = field(default_factory=DefenceSettings, metadata={"help": "hostile updates (see README: security)"})
    ingest: IngestSettings = field(default_factory=IngestSettings, metadata={"help": "ingest"})
    broadcast: BroadcastSettings = field(default_factory=BroadcastSettings, metadata={
        "help": "broadcasts: how each model version reaches devices (see README: delta broadcasts)"})
    monitoring: MonitoringSettings = field(default_factory=MonitoringSettings, metadata={"help": "monitoring"})
    secagg: SecureSettings = field(default_factory=SecureSettings, metadata={"help": "secure aggregation (with --secure-aggregation)"})

    def __post_init__(self) -> None:
        files = {name: value for name in ("ca_file", "cert_file", "key_file")
                 if (value := getattr(self, name)) is not None and getattr(self.broker, name) is None}
        if files:  # the settings give the TLS files apart from the URL; the connection reads them from the address
            object.__setattr__(self, "broker", dataclasses.replace(self.broker, **files))
        check_name("fleet", self.fleet)
        if self.strategy.name not in STRATEGIES:
            raise ValueError(f"unknown strategy {self.strategy.name!r} (known: {', '.join(STRATEGIES)}; FedProx = fedavg with --mu)")
        parse_chain(self.global_codec)
        if self.broadcast.deltas and self.global_codec != "none":
            raise ValueError(f"global_codec {self.global_codec!r} is the codec of whole-model broadcasts: with delta broadcasts "
                             "(the default) set the broadcast chain (--broadcast-chain), or turn them off (--no-delta-broadcasts)")
        self._check_secure()
        self._check_privacy()
        self._check_workers()

    def _check_secure(self) -> None:
        """What secure aggregation cannot run with, every refusal in one message; an unset update codec becomes none."""
        if not self.rounds.secure_aggregation:
            return
        try:
            from aggregator.secagg_relay import check_compatible
        except ImportError as exc:
            raise ValueError(f"--secure-aggregation needs the 'cryptography' package ({exc}): pip install 'fedge[aggregator]'") from None
        defence = self.defence
        check_compatible(mode=self.rounds.mode, aggregation=defence.aggregation, codec=self.training.codec or "none",
                         clip_factor=defence.factor, clip_action=defence.clip_action, workers=self.ingest.workers)
        if not self.training.codec:
            object.__setattr__(self, "training", dataclasses.replace(self.training, codec="none"))

    def _check_privacy(self) -> None:
        defence = self.defence
        if defence.dp_noise is None:
            return
        if defence.aggregation != "mean" or defence.factor is not None or defence.clip_action != "clip":
            raise ValueError("differential privacy needs --aggregation mean and a fixed --clip-norm (clip, not reject or auto)")
        if defence.dp_population is not None and defence.dp_population < self.rounds.plan.target:
            raise ValueError("dp_population must be >= the round target")
        _ = self.privacy  # validates the DP parameters

    def _check_workers(self) -> None:
        """Workers fold partial sums that the coordinator adds up: only associative rules can be split."""
        if not self.ingest.workers:
            return
        if self.rounds.mode != "sync":
            raise ValueError("--workers needs synchronous rounds: --mode async keeps one process (its buffer admits in memory)")
        if self.defence.aggregation != "mean":
            raise ValueError(f"--workers needs --aggregation mean: {self.defence.aggregation} needs every update in one place, not partial sums")
        if self.defence.factor is not None:
            raise ValueError("--workers needs a fixed --clip-norm: --clip-norm auto follows the norms seen by one process")

    @property
    def privacy(self) -> PrivacyParams | None:
        defence = self.defence
        if defence.dp_noise is None:
            return None
        per_round = self.rounds.per_round
        rate = per_round / defence.dp_population if defence.dp_population else 1.0
        return PrivacyParams(noise_multiplier=defence.dp_noise, clip_norm=defence.bound or 0.0, sample_rate=rate, delta=defence.dp_delta)

    @property
    def mqtt_client_id(self) -> str:
        return self.client_id or f"fedge-aggregator-{self.fleet}"

    def to_wire(self) -> dict[str, Any]:
        """Plain values (msgpack-able) for an ingest worker's pipe; ``from_wire`` rebuilds and re-validates."""
        return _plain(self)

    @classmethod
    def from_wire(cls, wire: Mapping[str, Any]) -> AggregatorConfig:
        keys = _keys(wire)
        merged = LOADER.gather({k: v for k, v in keys.items() if k not in _CODE_ONLY_HINTS}, environ={})
        merged.values.update({k: v for k, v in keys.items() if k in _CODE_ONLY_HINTS and v is not None})
        return build(merged)


def _plain(value: Any) -> Any:
    """A config value as msgpack-able plain values (``from_wire`` converts them back)."""
    if isinstance(value, ClipNorm):
        return str(value)
    if isinstance(value, BrokerAddress):
        return dataclasses.asdict(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, frozenset):
        return sorted(value)
    if isinstance(value, Mapping):
        return dict(value)
    return value


def _keys(wire: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``to_wire``'s nesting as the loader's setting keys (``rounds.target``); code-only fields keep their place."""
    out: dict[str, Any] = {}
    for name, value in wire.items():
        key = prefix + name
        if key in LOADER.sections and isinstance(value, Mapping):
            out.update(_keys(value, key + "."))
        elif key == "broker":
            out[key] = BrokerAddress(**value)
        else:
            out[key] = value
    return out


LOADER = Loader(AggregatorConfig)


def _code_only() -> dict[str, Any]:
    """Key -> type hint of every code-only field (``setting: False``): tests and the simulation set them, users cannot."""
    found: dict[str, Any] = {}
    sections = {f.name: f for f in dataclasses.fields(AggregatorConfig)}
    for prefix, cls in [("", AggregatorConfig), *((name + ".", typing.get_type_hints(AggregatorConfig)[name]) for name in LOADER.sections)]:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if f.metadata.get("setting", True) is False:
                found[prefix + f.name] = hints[f.name]
    del sections
    return found


_CODE_ONLY_HINTS = _code_only()
_ALL_KEYS = frozenset({s.key for s in LOADER.settings} | set(_CODE_ONLY_HINTS))


def build(merged: Merged[AggregatorConfig]) -> AggregatorConfig:
    """Validate the merged settings at once (every problem in one SettingsError), code-only fields included."""
    code_only = {key: merged.values.pop(key) for key in list(merged.values) if key in _CODE_ONLY_HINTS}
    config = LOADER.build(merged)
    if not code_only:
        return config
    try:
        values = {key: convert(value, _CODE_ONLY_HINTS[key]) for key, value in code_only.items()}
        top = {k: v for k, v in values.items() if "." not in k}
        sections: dict[str, dict[str, Any]] = {}
        for key, value in values.items():
            if "." in key:
                section, _, name = key.partition(".")
                sections.setdefault(section, {})[name] = value
        changes = {**top, **{section: dataclasses.replace(getattr(config, section), **fields) for section, fields in sections.items()}}
        return dataclasses.replace(config, **changes)
    except ValueError as exc:
        raise SettingsError(str(exc)) from exc


def config_of(broker: BrokerAddress | str, **settings: Any) -> AggregatorConfig:
    """A config from Python, validated as the command line's is: settings by name (``target=5``,
    ``rounds=3`` for the number of rounds, ``clip_norm="auto"``). A name is a setting's field name,
    or ``section.name`` where two sections share one (``training.momentum``, ``strategy.momentum``),
    or a section's name with a mapping of its fields (``training={"codec": "none"}``); code-only
    fields (``dp_seed``, ``inbox_limit``, ``allowed_clients``, ``client_id``...) are accepted too."""
    values: dict[str, Any] = {"broker": broker}
    for name, value in settings.items():
        if name in LOADER.sections and isinstance(value, Mapping):  # training={"codec": "none"}: a section's fields
            values.update({f"{name}.{field}": item for field, item in value.items()})
        else:
            values[_key_of(name)] = value
    merged = LOADER.gather({k: v for k, v in values.items() if k not in _CODE_ONLY_HINTS}, environ={})
    merged.values.update({k: v for k, v in values.items() if k in _CODE_ONLY_HINTS})
    return build(merged)


def _key_of(name: str) -> str:
    if name in _ALL_KEYS:
        return name
    matches = [key for key in _ALL_KEYS if key.rpartition(".")[2] == name]
    if len(matches) == 1:
        return matches[0]
    if not matches:
        raise SettingsError(f"unknown aggregator setting {name!r}")
    raise SettingsError(f"aggregator setting {name!r} is ambiguous: say {' or '.join(sorted(matches))}")
