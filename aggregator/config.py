"""The aggregator's configuration: one frozen dataclass, validated once."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aggregator.rounds import RoundPlan
from fedge_contract.codecs import parse_chain
from fedge_contract.mqtt import BrokerAddress
from fedge_contract.topics import check_name


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
    global_codec: str = "none"  # codec of the broadcast model
    store: Path = Path("fedge-aggregator.sqlite")
    max_update_bytes: int | None = None  # None: derived from the model size
    evaluate: bool = True  # evaluate each new model on the task's held-out data
    client_id: str | None = None  # MQTT client id; default fedge-aggregator-<fleet>
    session_expiry: int = 24 * 3600  # seconds the broker queues updates while the aggregator is away

    def __post_init__(self) -> None:
        check_name("fleet", self.fleet)
        if self.rounds < 0:
            raise ValueError("rounds must be >= 0 (0 = run forever)")
        self.plan  # validates target/min/deadline
        parse_chain(self.global_codec)
        if "codec" in self.training:
            parse_chain(str(self.training["codec"]))

    @property
    def plan(self) -> RoundPlan:
        return RoundPlan(target=self.target, min_updates=self.min_updates, timeout=self.deadline)

    @property
    def mqtt_client_id(self) -> str:
        return self.client_id or f"fedge-aggregator-{self.fleet}"
