"""The agent's configuration: one frozen dataclass, validated once."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from edge_agent.attack import ATTACKS
from fedge_contract.chunks import DEFAULT_MAX_MESSAGE_BYTES, MIN_MESSAGE_BYTES
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
    max_model_bytes: int = 256 * 1024 * 1024  # largest global model accepted, whole or in chunks
    # An update above this goes out in chunks with a manifest (fedge_contract/chunks.py); keep it a
    # few KiB below the broker's max_packet_size. The aggregator chunks the global model by its own.
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    chunk_timeout: float = 120.0  # seconds without a new chunk of the global model before the partial set is dropped
    torch_threads: int = 1
    exit_when_final: bool = False  # stop once the aggregator announces the final model
    # Train in a child process that exits after each round, so the waiting agent never holds torch
    # (~40 MiB instead of ~260). The simulation hosts many agents in one process: False there.
    isolate_training: bool = False
    train_nice: int = 0  # niceness added to the training child (0-19): the device's owner comes first
    max_train_memory_mib: float | None = None  # refuse a task whose model + training data exceed this
    # Simulation only (fedge simulate --stragglers): training is made to look like it took
    # max(real, emulated_train_seconds) * slowdown seconds, by waiting before the update is queued.
    slowdown: float = 1.0
    emulated_train_seconds: float = 0.0
    attack: str = "none"  # TEST ONLY (bench/poisoning): rewrite the delta maliciously, see edge_agent/attack.py

    def __post_init__(self) -> None:
        check_name("client id", self.client_id)
        check_name("fleet", self.fleet)
        if self.attack not in ATTACKS:
            raise ValueError(f"unknown attack {self.attack!r}")
        if not self.slowdown >= 1.0 or not self.emulated_train_seconds >= 0:
            raise ValueError("slowdown must be >= 1 and emulated_train_seconds >= 0")
        if self.max_message_bytes < MIN_MESSAGE_BYTES or not self.chunk_timeout > 0:
            raise ValueError(f"max_message_bytes must be >= {MIN_MESSAGE_BYTES}, got {self.max_message_bytes}; chunk_timeout > 0")
        if self.torch_threads < 1:
            raise ValueError("torch_threads must be >= 1")
        if not 0 <= self.train_nice <= 19:
            raise ValueError(f"train_nice must be 0-19, got {self.train_nice}")
        if self.max_train_memory_mib is not None and self.max_train_memory_mib <= 0:
            raise ValueError(f"max_train_memory_mib must be > 0, got {self.max_train_memory_mib}")
