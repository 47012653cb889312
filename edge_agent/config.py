"""The agent's configuration: one frozen dataclass, validated once."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from fedge_contract.mqtt import BrokerAddress
from fedge_contract.topics import check_name


@dataclass(frozen=True)
class AgentConfig:
    broker: BrokerAddress
    client_id: str
    state_dir: Path
    fleet: str = "default"
    task: str = "digits"
    task_options: Mapping[str, str] = field(default_factory=dict)
    seed: int = 0  # local shuffling seed = f(seed, client id, round)
    keepalive: int = 30
    session_expiry: int = 24 * 3600  # seconds the broker keeps receipts and the newest model for us
    backoff_base: float = 0.5  # reconnect delay ~ U(0, min(cap, base * 2**attempt))
    backoff_cap: float = 30.0
    max_model_bytes: int = 256 * 1024 * 1024
    torch_threads: int = 1
    exit_when_final: bool = False  # stop once the aggregator announces the final model

    def __post_init__(self) -> None:
        check_name("client id", self.client_id)
        check_name("fleet", self.fleet)
        if self.torch_threads < 1:
            raise ValueError("torch_threads must be >= 1")
