"""The aggregator's configuration: one frozen dataclass, validated once."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aggregator.async_rounds import BufferPlan, staleness_function
from aggregator.clipping import NormBound
from aggregator.privacy import PrivacyParams
from aggregator.robust import AGGREGATIONS
from aggregator.rounds import RoundPlan
from aggregator.strategies import STRATEGIES, StrategyConfig
from fedge_contract.chunks import DEFAULT_MAX_MESSAGE_BYTES, MIN_MESSAGE_BYTES
from fedge_contract.codecs import parse_chain
from fedge_contract.mqtt import BrokerAddress
from fedge_contract.topics import check_name

DURABILITY = ("disk", "process")


@dataclass(frozen=True)
class AggregatorConfig:
    broker: BrokerAddress
    fleet: str = "default"
    task: str = "digits"
    task_options: Mapping[str, str] = field(default_factory=dict)
    rounds: int = 30  # model versions to produce, then publish the final model and exit; 0 = forever
    target: int = 10  # updates that close a round early
    min_updates: int = 1  # updates needed to close a round at its deadline
    deadline: float = 60.0  # seconds a round stays open (and each extension)
    training: Mapping[str, Any] = field(default_factory=dict)  # TaskConfig fields overriding the task's suggestion
    strategy: str = "fedavg"
    strategy_params: StrategyConfig = field(default_factory=StrategyConfig)  # server_lr, momentum, betas, tau
    mode: str = "sync"  # sync: rounds with deadlines; async: FedBuff (aggregator/async_rounds.py)
    buffer_size: int = 10  # async: accepted updates per new model version
    max_staleness: int = 10  # async: oldest base version accepted is newest - max_staleness
    staleness: str = "sqrt"  # async: staleness weight f(s): sqrt = 1/sqrt(1+s), constant, poly:<a>
    global_codec: str = "none"  # codec of the broadcast model
    store: Path = Path("fedge-aggregator.sqlite")
    max_update_bytes: int | None = None  # None: derived from the model size
    # Updates waiting in memory before the connection stops reading (TCP backpressure, see
    # fedge_contract.mqtt): a flood waits in the broker, so memory is O(model), not O(updates).
    inbox_limit: int = 8
    # "disk": a receipt leaves only once its update is fsync'd (survives a power cut); "process":
    # written in order but never fsync'd (survives a crash of the aggregator, not of the host).
    durability: str = "disk"
    # A global model above this goes out in chunks with a manifest (fedge_contract/chunks.py); agents
    # chunk their updates by their own setting. Keep it a few KiB below the broker's max_packet_size.
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    chunk_timeout: float = 60.0  # seconds without a new chunk before a partial chunked update is refused (incomplete)
    evaluate: bool = True  # evaluate each new model on the task's held-out data
    client_id: str | None = None  # MQTT client id; default fedge-aggregator-<fleet>
    session_expiry: int = 24 * 3600  # seconds the broker queues updates while the aggregator is away
    # Hostile updates (aggregator/defence.py): allowlist, weight cap, norm bound, robust rule, client-level DP.
    allow_clients: frozenset[str] | None = None  # None: any client id the broker lets publish
    max_num_samples: int = 10_000_000  # an update claiming more is rejected
    max_weight: int | None = None  # an update's weight is min(num_samples, max_weight)
    clip_norm: float | None = None  # fixed L2 bound on each delta (with clip_factor: the warm-up bound)
    clip_factor: float | None = None  # adaptive bound: factor x median norm of recent accepted deltas
    clip_action: str = "clip"  # clip | reject
    aggregation: str = "mean"  # mean | median | trimmed_mean | krum (aggregator/robust.py)
    robust_fraction: float = 0.2  # share of each round's updates assumed malicious (trimmed mean, Krum)
    dp_noise: float | None = None  # client-level DP noise multiplier z (noise std = z * clip_norm)
    dp_delta: float = 1e-5
    dp_population: int | None = None  # devices in the fleet: sample rate q = target / population (None: q = 1)
    dp_seed: int | None = None  # tests only: DP noise from a seeded generator instead of OS entropy
    metrics_port: int | None = None  # serve Prometheus metrics on this port (0: a free one); None: off
    metrics_host: str = "127.0.0.1"  # address the metrics server (and dashboard) listens on
    dashboard_port: int | None = None  # serve the web dashboard on this port (0: a free one); None: off
    workers: int = 0  # ingest worker processes on a shared subscription (aggregator/sharded.py); 0: this process ingests

    def __post_init__(self) -> None:
        check_name("fleet", self.fleet)
        if self.rounds < 0:
            raise ValueError("rounds must be >= 0 (0 = run forever)")
        _ = self.plan  # building it validates target/min/deadline
        if self.mode not in ("sync", "async"):
            raise ValueError(f"mode must be sync or async, got {self.mode!r}")
        if self.strategy not in STRATEGIES:
            raise ValueError(f"unknown strategy {self.strategy!r} (known: {', '.join(STRATEGIES)}; FedProx = fedavg with --mu)")
        _ = self.buffer_plan  # building it validates buffer_size/max_staleness
        staleness_function(self.staleness)
        parse_chain(self.global_codec)
        self._check_defences()
        if "codec" in self.training:
            parse_chain(str(self.training["codec"]))
        if self.dashboard_port and self.dashboard_port == self.metrics_port:
            raise ValueError("the dashboard and the metrics need different ports")
        if self.durability not in DURABILITY:
            raise ValueError(f"durability must be one of {', '.join(DURABILITY)}, got {self.durability!r}")
        if self.inbox_limit < 2:
            raise ValueError(f"inbox_limit must be >= 2, got {self.inbox_limit}")
        if self.max_message_bytes < MIN_MESSAGE_BYTES or not self.chunk_timeout > 0:
            raise ValueError(f"max_message_bytes must be >= {MIN_MESSAGE_BYTES} and chunk_timeout > 0")
        self._check_workers()

    @property
    def plan(self) -> RoundPlan:
        return RoundPlan(target=self.target, min_updates=self.min_updates, timeout=self.deadline)

    @property
    def buffer_plan(self) -> BufferPlan:
        return BufferPlan(target=self.buffer_size, min_updates=self.buffer_size, max_staleness=self.max_staleness)

    def _check_defences(self) -> None:
        if self.aggregation not in AGGREGATIONS:
            raise ValueError(f"unknown aggregation {self.aggregation!r} (known: {', '.join(AGGREGATIONS)})")
        if not 0 <= self.robust_fraction < 0.5:
            raise ValueError(f"robust_fraction must be in [0, 0.5), got {self.robust_fraction}")
        if self.max_num_samples < 1 or (self.max_weight is not None and self.max_weight < 1):
            raise ValueError("max_num_samples and max_weight must be >= 1")
        NormBound(clip_norm=self.clip_norm, factor=self.clip_factor, action=self.clip_action)  # validates
        if self.allow_clients is not None:
            for client in self.allow_clients:
                check_name("client id", client)
        if self.dp_noise is not None:
            if self.aggregation != "mean" or self.clip_factor is not None or self.clip_action != "clip":
                raise ValueError("differential privacy needs --aggregation mean and a fixed --clip-norm (clip, not reject or auto)")
            if self.dp_population is not None and self.dp_population < self.plan.target:
                raise ValueError("dp_population must be >= the round target")
        _ = self.privacy  # building it validates the DP parameters

    def _check_workers(self) -> None:
        """Workers fold partial sums that the coordinator adds up: only associative rules can be split."""
        if self.workers < 0:
            raise ValueError(f"workers must be >= 0, got {self.workers}")
        if not self.workers:
            return
        if self.mode != "sync":
            raise ValueError("--workers needs synchronous rounds: --mode async keeps one process (its buffer admits in memory)")
        if self.aggregation != "mean":
            raise ValueError(f"--workers needs --aggregation mean: {self.aggregation} needs every update in one place, not partial sums")
        if self.clip_factor is not None:
            raise ValueError("--workers needs a fixed --clip-norm: --clip-norm auto follows the norms seen by one process")

    @property
    def privacy(self) -> PrivacyParams | None:
        if self.dp_noise is None:
            return None
        per_round = self.buffer_size if self.mode == "async" else self.target
        rate = per_round / self.dp_population if self.dp_population else 1.0
        return PrivacyParams(noise_multiplier=self.dp_noise, clip_norm=self.clip_norm or 0.0, sample_rate=rate, delta=self.dp_delta)

    @property
    def mqtt_client_id(self) -> str:
        return self.client_id or f"fedge-aggregator-{self.fleet}"

    def to_wire(self) -> dict[str, Any]:
        """Plain values (msgpack-able) for an ingest worker's pipe; ``from_wire`` rebuilds and re-validates."""
        wire: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if dataclasses.is_dataclass(value):
                value = dataclasses.asdict(value)  # type: ignore[arg-type]
            elif isinstance(value, Path):
                value = str(value)
            elif isinstance(value, frozenset):
                value = sorted(value)
            elif isinstance(value, Mapping):
                value = dict(value)
            wire[f.name] = value
        return wire

    @classmethod
    def from_wire(cls, wire: Mapping[str, Any]) -> AggregatorConfig:
        values = dict(wire)
        values["broker"] = BrokerAddress(**values["broker"])
        values["strategy_params"] = StrategyConfig(**values["strategy_params"])
        values["store"] = Path(values["store"])
        if values.get("allow_clients") is not None:
            values["allow_clients"] = frozenset(values["allow_clients"])
        return cls(**values)
