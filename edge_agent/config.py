"""The agent's configuration: one frozen dataclass, validated once."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from edge_agent.attack import ATTACKS
from fedge_contract import reconnect
from fedge_contract.chunks import DEFAULT_MAX_MESSAGE_BYTES, MIN_MESSAGE_BYTES
from fedge_contract.mqtt import BrokerAddress
from fedge_contract.topics import check_name

_RESOURCES = "resources"
_CODE_ONLY = {"setting": False}  # set by code (the simulation, tests), never by a device's settings


@dataclass(frozen=True)
class AgentConfig:
    """Defaults are a real device's (a child process per round, niced); the simulation sets its own.

    The metadata are the settings' flags and help (fedge_runtime/settings.py reads them).
    """

    broker: BrokerAddress = field(metadata={"help": "mqtt://[user:password@]host:port or mqtts://...", "parse": BrokerAddress.parse})
    client_id: str = field(metadata={"help": "this device's id (letters, digits, . _ -)"})
    state_dir: Path = field(metadata={"help": "outbox and state (keep it across restarts)"})
    ca_file: str | None = field(default=None, metadata={"help": "CA certificate for mqtts://"})
    cert_file: str | None = field(default=None, metadata={"help": "this device's client certificate for mqtts:// (with --key-file)"})
    key_file: str | None = field(default=None, metadata={"help": "the private key of --cert-file"})
    fleet: str = field(default="default", metadata={"help": "the fleet this device belongs to"})
    task: str = field(default="digits", metadata={"help": "MODULE:OBJECT of a fedge task, or a built-in name"})
    task_options: Mapping[str, str] = field(default_factory=dict, metadata={"flag": "--task-opt", "help": "option passed to the task (repeatable)"})
    seed: int = field(default=0, metadata={"help": "seeds local shuffling: f(seed, client id, round)"})
    keepalive: int = field(default=30, metadata={"help": "MQTT keepalive, seconds"})
    session_expiry: int = field(default=24 * 3600, metadata=_CODE_ONLY)  # seconds the broker keeps receipts and the newest model for us
    # reconnect delay ~ U(0, min(cap, max(base, 0.5 * seconds offline))): see fedge_contract/reconnect.py
    backoff_base: float = field(default=reconnect.FIRST_WINDOW, metadata=_CODE_ONLY)
    backoff_cap: float = field(default=reconnect.CAP, metadata=_CODE_ONLY)
    max_model_bytes: int = field(default=256 * 1024 * 1024, metadata=_CODE_ONLY)  # largest global model accepted, whole or in chunks
    # An update above this goes out in chunks with a manifest (fedge_contract/chunks.py); keep it a
    # few KiB below the broker's max_packet_size. The aggregator chunks the global model by its own.
    max_message_bytes: int = field(default=DEFAULT_MAX_MESSAGE_BYTES, metadata={
        "group": _RESOURCES, "metavar": "BYTES", "help": "an update above this is published in chunks with a manifest"})
    # seconds without a new chunk of the global model before the partial set is dropped
    chunk_timeout: float = field(default=120.0, metadata=_CODE_ONLY)
    torch_threads: int = field(default=1, metadata={"group": _RESOURCES, "help": "threads the training uses"})
    exit_when_final: bool = field(default=False, metadata={
        "action": "store_true", "help": "exit once the aggregator publishes its final model"})
    # On the final model, receipts may still come for the last round's updates (the aggregator sends
    # its queued ones before it exits): seconds to wait for them before dropping the rest (edge_agent/settle.py).
    final_receipt_grace: float = field(default=5.0, metadata=_CODE_ONLY)
    # Train in a child process that exits after each round, so the waiting agent never holds torch
    # (~40 MiB instead of ~260). The simulation hosts many agents in one process: False there.
    isolate_training: bool = field(default=True, metadata={
        "group": _RESOURCES, "flag": "--in-process-training", "action": "store_false", "show_default": False,
        "help": "train inside the agent's process (keeps torch loaded, ~260 MiB) instead of a child that exits"})
    train_nice: int = field(default=10, metadata={  # the device's owner comes first
        "group": _RESOURCES, "flag": "--nice", "help": "niceness added to the training child, 0-19"})
    max_train_memory_mib: float | None = field(default=None, metadata={  # refuse a task whose model + training data exceed this
        "group": _RESOURCES, "flag": "--max-train-memory", "metavar": "MIB", "help": "refuse a task whose model and training data exceed this"})
    # Simulation only (fedge simulate --stragglers): training is made to look like it took
    # max(real, emulated_train_seconds) * slowdown seconds, by waiting before the update is queued.
    slowdown: float = field(default=1.0, metadata=_CODE_ONLY)
    emulated_train_seconds: float = field(default=0.0, metadata=_CODE_ONLY)
    attack: str = field(default="none", metadata=_CODE_ONLY)  # TEST ONLY (bench/poisoning): rewrite the delta maliciously, see edge_agent/attack.py

    def __post_init__(self) -> None:
        # the settings give the TLS files apart from the URL; the connection reads them from the address
        files = {name: value for name in ("ca_file", "cert_file", "key_file")
                 if (value := getattr(self, name)) is not None and getattr(self.broker, name) is None}
        if files:
            object.__setattr__(self, "broker", dataclasses.replace(self.broker, **files))
        check_name("client id", self.client_id)
        check_name("fleet", self.fleet)
        if self.attack not in ATTACKS:
            raise ValueError(f"unknown attack {self.attack!r}")
        if not self.slowdown >= 1.0 or not self.emulated_train_seconds >= 0:
            raise ValueError("slowdown must be >= 1 and emulated_train_seconds >= 0")
        if self.max_message_bytes < MIN_MESSAGE_BYTES or not self.chunk_timeout > 0:
            raise ValueError(f"max_message_bytes must be >= {MIN_MESSAGE_BYTES}, got {self.max_message_bytes}; chunk_timeout > 0")
        if not self.final_receipt_grace >= 0:
            raise ValueError(f"final_receipt_grace must be >= 0, got {self.final_receipt_grace}")
        if self.torch_threads < 1:
            raise ValueError("torch_threads must be >= 1")
        if not 0 <= self.train_nice <= 19:
            raise ValueError(f"train_nice must be 0-19, got {self.train_nice}")
        if self.max_train_memory_mib is not None and self.max_train_memory_mib <= 0:
            raise ValueError(f"max_train_memory_mib must be > 0, got {self.max_train_memory_mib}")
