"""The agent's one configuration: a TOML file, FEDGE_* environment variables and flags, validated once.

Precedence, highest first: command-line flags, environment, the TOML file, defaults. The file::

    broker = "mqtts://kitchen-pi:secret@hub.local:8883"
    # or a client certificate instead of the password: cert_file = "/etc/fedge/kitchen-pi.crt", key_file = "..."
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
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edge_agent.config import AgentConfig
from edge_agent.policy import Policy, PolicyError, policy_from_mapping
from edge_agent.probes import DeviceProbe
from fedge_contract.chunks import DEFAULT_MAX_MESSAGE_BYTES
from fedge_contract.mqtt import BrokerAddress


class SettingsError(ValueError):
    """The configuration is invalid; the message says which setting, from where, and what to do."""


# top-level key -> type; the file, the environment and the flags share these names
KEYS: dict[str, type] = {
    "broker": str, "ca_file": str, "cert_file": str, "key_file": str, "client_id": str, "state_dir": Path, "fleet": str, "task": str,
    "task_options": dict, "seed": int, "torch_threads": int, "train_nice": int, "max_train_memory_mib": float,
    "isolate_training": bool, "exit_when_final": bool, "keepalive": int, "sample_seconds": float,
    "sysfs_root": Path, "procfs_root": Path, "max_message_bytes": int,
}
DEFAULTS: dict[str, Any] = {
    "fleet": "default", "task": "digits", "task_options": {}, "seed": 0, "torch_threads": 1, "train_nice": 10,
    "max_train_memory_mib": None, "isolate_training": True, "exit_when_final": False, "keepalive": 30,
    "sample_seconds": 10.0, "sysfs_root": Path("/sys"), "procfs_root": Path("/proc"),
    "max_message_bytes": DEFAULT_MAX_MESSAGE_BYTES,
}
REQUIRED = {
    "broker": "--broker URL, FEDGE_BROKER or `broker = \"mqtt://host:1883\"` in the config file",
    "client_id": "--client-id, FEDGE_CLIENT_ID or `client_id = \"...\"`",
    "state_dir": "--state-dir, FEDGE_STATE_DIR or `state_dir = \"...\"`",
}


@dataclass(frozen=True)
class AgentSettings:
    agent: AgentConfig
    policy: Policy
    preset: str  # the preset the policy started from (``auto`` resolved)
    sample_seconds: float  # how often the gate reads the probes
    sysfs_root: Path
    procfs_root: Path

    def probe(self) -> DeviceProbe:
        from edge_agent.probes import default_probe

        return default_probe(self.policy.load_window, self.sysfs_root, self.procfs_root)


@dataclass(frozen=True)
class RawSettings:
    """Merged, typed values before validation (``doctor`` inspects these even when incomplete)."""

    values: dict[str, Any]
    policy: dict[str, Any]
    sources: dict[str, str]  # key -> where it came from, for error messages


def gather(flags: Mapping[str, Any], *, config_file: Path | None = None, environ: Mapping[str, str] | None = None) -> RawSettings:
    """Merge defaults < file < environment < flags (flags: None means not given)."""
    environ = os.environ if environ is None else environ
    values: dict[str, Any] = dict(DEFAULTS)
    sources = {key: "default" for key in DEFAULTS}
    policy: dict[str, Any] = {}
    config_file = config_file or (Path(environ["FEDGE_CONFIG"]) if environ.get("FEDGE_CONFIG") else None)
    if config_file is not None:
        _merge_file(config_file, values, policy, sources)
    for key in KEYS:
        raw = environ.get(f"FEDGE_{key.upper()}")
        if raw is not None and key != "task_options":
            values[key] = _convert(key, raw, f"FEDGE_{key.upper()}")
            sources[key] = f"FEDGE_{key.upper()}"
    for name, raw in environ.items():
        if name == "FEDGE_POLICY":
            policy["preset"] = raw
        elif name.startswith("FEDGE_POLICY_"):
            policy[name.removeprefix("FEDGE_POLICY_").lower()] = raw
    for key, value in flags.items():
        if value is None:
            continue
        if key == "policy":
            policy.update({k: v for k, v in value.items() if v is not None})
        elif key in KEYS:
            values[key] = _convert(key, value, "--" + key.replace("_", "-"))
            sources[key] = "flag"
        else:
            raise SettingsError(f"unknown flag setting {key!r}")
    return RawSettings(values, policy, sources)


def _merge_file(path: Path, values: dict[str, Any], policy: dict[str, Any], sources: dict[str, str]) -> None:
    try:
        data = tomllib.loads(path.read_text())
    except OSError as exc:
        raise SettingsError(f"cannot read the config file {path}: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise SettingsError(f"{path} is not valid TOML: {exc}") from None
    unknown = sorted(set(data) - set(KEYS) - {"policy"})
    if unknown:
        raise SettingsError(f"{path}: unknown setting(s) {', '.join(unknown)} (known: {', '.join(sorted(KEYS))}, [policy])")
    table = data.pop("policy", {})
    if not isinstance(table, dict):
        raise SettingsError(f"{path}: `policy` must be a table ([policy])")
    policy.update(table)
    for key, value in data.items():
        values[key] = _convert(key, value, str(path))
        sources[key] = str(path)


def _convert(key: str, value: Any, origin: str) -> Any:
    kind = KEYS[key]
    try:
        if kind is dict:
            if not isinstance(value, dict):
                raise TypeError
            return {str(k): str(v) for k, v in value.items()}
        if kind is bool:
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            if text not in ("1", "0", "true", "false", "yes", "no", "on", "off"):
                raise ValueError
            return text in ("1", "true", "yes", "on")
        if kind is int and isinstance(value, float):
            raise TypeError
        if key == "max_train_memory_mib" and str(value).strip().lower() in ("", "none", "off"):
            return None
        return kind(value)
    except (TypeError, ValueError):
        name = {int: "an integer", float: "a number", bool: "true or false", dict: "a table", Path: "a path", str: "a string"}[kind]
        raise SettingsError(f"{key} (from {origin}) must be {name}, got {value!r}") from None


def build(raw: RawSettings) -> AgentSettings:
    """Validate everything at once; the first problem raises SettingsError."""
    values = raw.values
    missing = [f"{key}: {how}" for key, how in REQUIRED.items() if not values.get(key)]
    if missing:
        raise SettingsError("missing setting(s):\n  " + "\n  ".join(missing))
    try:
        if values.get("key_file") and not values.get("cert_file"):
            raise SettingsError(f"key_file (from {raw.sources['key_file']}) needs cert_file: the client certificate it belongs to")
        address = BrokerAddress.parse(values["broker"], ca_file=values.get("ca_file"), cert_file=values.get("cert_file"),
                                      key_file=values.get("key_file"))
        agent = AgentConfig(
            broker=address, client_id=values["client_id"], state_dir=values["state_dir"], fleet=values["fleet"],
            task=values["task"], task_options=values["task_options"], seed=values["seed"],
            keepalive=values["keepalive"], torch_threads=values["torch_threads"], exit_when_final=values["exit_when_final"],
            isolate_training=values["isolate_training"], train_nice=values["train_nice"],
            max_train_memory_mib=values["max_train_memory_mib"], max_message_bytes=values["max_message_bytes"],
        )
    except ValueError as exc:
        raise SettingsError(str(exc)) from None
    if values["sample_seconds"] < 1:
        raise SettingsError(f"sample_seconds must be >= 1, got {values['sample_seconds']}")
    policy, preset = build_policy(raw)
    return AgentSettings(agent, policy, preset, values["sample_seconds"], values["sysfs_root"], values["procfs_root"])


def build_policy(raw: RawSettings) -> tuple[Policy, str]:
    has_battery = DeviceProbe(sysfs=raw.values["sysfs_root"], termux=False).power().has_battery
    try:
        return policy_from_mapping(raw.policy, has_battery=has_battery)
    except PolicyError as exc:
        raise SettingsError(str(exc)) from None


def load(flags: Mapping[str, Any], *, config_file: Path | None = None, environ: Mapping[str, str] | None = None) -> AgentSettings:
    return build(gather(flags, config_file=config_file, environ=environ))
