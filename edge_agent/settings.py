"""The agent's one configuration: a TOML file, FEDGE_* environment variables and flags, validated once.

The schema is ``AgentSettings``: ``AgentConfig`` and ``ProbeSettings`` at the top level, ``Policy``
in the ``[policy]`` table. Their fields' defaults are the only defaults and their metadata are the
flags (fedge_runtime/settings.py reads both). Precedence, highest first: command-line flags,
environment, the TOML file, defaults. The file::

    broker = "mqtts://kitchen-pi:secret@hub.local:8883"
    client_id = "kitchen-pi"
    state_dir = "/var/lib/fedge-agent"
    task = "digits"
    torch_threads = 1            # resource limits
    train_nice = 10
    max_train_memory_mib = 512
    [task_options]
    clients = "20"
    [policy]
    preset = "pi"                # phone | laptop | pi | always | auto
    max_temperature_c = 70

Environment: ``FEDGE_<KEY>`` for a top-level key (``FEDGE_BROKER``, ``FEDGE_TRAIN_NICE``),
``FEDGE_POLICY`` for the preset and ``FEDGE_POLICY_<KEY>`` for a policy field, ``FEDGE_CONFIG``
for the file. Every error names the setting, where it came from and what is accepted.

The policy is the one section built by hand: its values start from a preset (``auto`` needs
the device's battery, read from the configured sysfs), and only the fields some source gave
override the preset's.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edge_agent.config import AgentConfig
from edge_agent.policy import Policy, PolicyError, policy_from_mapping
from edge_agent.probes import DeviceProbe
from fedge_runtime.settings import Loader, Merged, SettingsError

__all__ = ["LOADER", "AgentSettings", "ProbeSettings", "RawSettings", "SettingsError", "build", "build_policy", "gather", "load"]


@dataclass(frozen=True)
class ProbeSettings:
    """Where and how often the gate reads the device (roots move for containers and tests)."""

    sample_seconds: float = field(default=10.0, metadata={"cli": False})  # how often the gate reads the probes
    sysfs_root: Path = field(default=Path("/sys"), metadata={"cli": False})
    procfs_root: Path = field(default=Path("/proc"), metadata={"cli": False})

    def __post_init__(self) -> None:
        if self.sample_seconds < 1:
            raise ValueError(f"sample_seconds must be >= 1, got {self.sample_seconds}")


@dataclass(frozen=True)
class AgentSettings:
    agent: AgentConfig = field(metadata={"flatten": True})
    probes: ProbeSettings = field(default_factory=ProbeSettings, metadata={"flatten": True})
    policy: Policy = field(default_factory=Policy, metadata={"help": "when to train (policy)"})

    @property
    def preset(self) -> str:
        """The preset the policy started from (``auto`` resolved)."""
        return self.policy.preset

    @property
    def sample_seconds(self) -> float:
        return self.probes.sample_seconds

    def probe(self) -> DeviceProbe:
        from edge_agent.probes import default_probe

        return default_probe(self.policy.load_window, self.probes.sysfs_root, self.probes.procfs_root)


LOADER = Loader(AgentSettings)

RawSettings = Merged[AgentSettings]  # merged, typed values before validation (``doctor`` inspects these)


def add_flags(parser: argparse.ArgumentParser) -> None:
    """The agent's flags, generated from the settings' metadata."""
    LOADER.add_flags(parser)


def gather(flags: Mapping[str, Any], *, config_file: Path | None = None, environ: Mapping[str, str] | None = None) -> RawSettings:
    """Merge defaults < file < environment < flags (flags: None means not given; a section is a nested mapping)."""
    return LOADER.gather(flags, config_file=config_file, environ=environ)


def build(raw: RawSettings) -> AgentSettings:
    """Validate everything at once; every problem found is in the one SettingsError raised."""
    problems: list[str] = []
    try:
        policy = build_policy(raw)
    except SettingsError as exc:
        problems.extend(exc.problems)
        policy = Policy()
    try:
        settings = LOADER.build(raw, replace={"policy": policy})
    except SettingsError as exc:
        problems[:0] = exc.problems
    if problems:
        raise SettingsError(problems)
    return settings


def build_policy(raw: RawSettings) -> Policy:
    """The policy: the preset's values, overridden by the ``[policy]`` fields some source gave."""
    # ``auto`` picks by the battery; a power reading that fails counts as none (mains), as before
    has_battery = DeviceProbe(sysfs=raw.get("sysfs_root"), termux=False).read().power.has_battery
    try:
        policy, _ = policy_from_mapping(raw.given("policy"), has_battery=has_battery)
    except PolicyError as exc:
        raise SettingsError(f"{exc}{raw.blame(str(exc), 'policy')}") from None
    return policy


def load(flags: Mapping[str, Any], *, config_file: Path | None = None, environ: Mapping[str, str] | None = None) -> AgentSettings:
    return build(gather(flags, config_file=config_file, environ=environ))
