"""The aggregator's one configuration: flags > FEDGE_* > TOML > the dataclasses' defaults, validated at once."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from aggregator.config import LOADER, ClipNorm, build, config_of
from fedge.cli import aggregator_config, build_parser
from fedge_runtime.settings import SettingsError

TOML = """
broker = "mqtt://aggregator:secret@hub.local:1883"
fleet = "kitchen"
store = "/var/lib/fedge/aggregator.sqlite"
[rounds]
rounds = 100
target = 20
min_updates = 10
deadline = 300
[training]
codec = "none"
[defence]
clip_norm = 0.5
[monitoring]
metrics_port = 9100
"""


def test_a_toml_file_sets_every_section(tmp_path: Path) -> None:
    (tmp_path / "agg.toml").write_text(TOML)
    config = build(LOADER.gather({}, config_file=tmp_path / "agg.toml", environ={}))
    assert (config.broker.host, config.broker.username, config.fleet, str(config.store)) == (
        "hub.local", "aggregator", "kitchen", "/var/lib/fedge/aggregator.sqlite")
    assert (config.rounds.rounds, config.rounds.target, config.rounds.min_updates, config.rounds.deadline) == (100, 20, 10, 300.0)
    assert config.training.overrides() == {"codec": "none"}  # "none" is a chain, not "unset"
    assert config.defence.clip_norm == ClipNorm(bound=0.5)
    assert config.monitoring.metrics_port == 9100


def test_flags_beat_the_environment_which_beats_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "agg.toml").write_text(TOML)
    monkeypatch.setenv("FEDGE_ROUNDS_TARGET", "30")
    monkeypatch.setenv("FEDGE_ROUNDS_DEADLINE", "45")
    monkeypatch.setenv("FEDGE_DEFENCE_CLIP_NORM", "auto:2")
    args = build_parser().parse_args(["aggregator", "--config", str(tmp_path / "agg.toml"), "--target", "40", "--no-eval"])
    config = aggregator_config(args)
    assert (config.rounds.target, config.rounds.deadline, config.rounds.min_updates) == (40, 45.0, 10)
    assert config.defence.clip_norm == ClipNorm(factor=2.0) and config.evaluate is False


def test_every_problem_is_reported_at_once_naming_the_setting_and_its_source(tmp_path: Path) -> None:
    (tmp_path / "bad.toml").write_text('broker = "mqtt://h:1"\n[rounds]\ntarget = "many"\nspeed = 3\n[defence]\nclip_norm = "sometimes"\n')
    with pytest.raises(SettingsError) as info:
        build(LOADER.gather({}, config_file=tmp_path / "bad.toml", environ={}))
    message = str(info.value)
    assert "rounds.target" in message and "bad.toml" in message and "an integer" in message
    assert "unknown setting(s) rounds.speed" in message
    assert "defence.clip_norm" in message and "auto:FACTOR" in message


def test_combinations_are_checked_once_built() -> None:
    with pytest.raises(SettingsError, match="need 1 <= min"):
        config_of("mqtt://h:1", target=3, min_updates=5)
    with pytest.raises(SettingsError, match="--workers needs synchronous rounds"):
        config_of("mqtt://h:1", workers=2, mode="async")
    with pytest.raises(SettingsError, match=r"ambiguous: say strategy\.momentum or training\.momentum"):
        config_of("mqtt://h:1", momentum=0.9)
    assert config_of("mqtt://h:1", **{"strategy.momentum": 0.5}).strategy.momentum == 0.5


def test_the_command_line_says_what_is_wrong_in_one_line() -> None:
    done = subprocess.run([sys.executable, "-m", "fedge", "aggregator", "--broker", "mqtt://127.0.0.1:1", "--mode", "sideways",
                           "--target", "x"], capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fedge aggregator: error:") and "rounds.target" in lines[0], done.stderr


def test_secure_aggregation_refuses_what_it_cannot_serve_and_takes_the_codec_none() -> None:
    config = config_of("mqtt://h:1", secure_aggregation=True, clip_norm="2.5", max_weight=400)
    assert config.training.codec == "none"  # unset: none, the only codec a masked vector can use
    assert config_of("mqtt://h:1", secure_aggregation=True, codec="none").training.codec == "none"
    assert config_of("mqtt://h:1").training.codec == ""  # without secure aggregation, unset stays the task's suggestion
    refused = {
        "mode": ("async", "needs --mode sync"), "aggregation": ("krum", "robust rules need every device's update"),
        "codec": ("flat+topk:0.01+q4+zstd", "the update codec must be 'none'"), "clip_norm": ("auto", "cannot run --clip-norm auto"),
        "workers": (2, "cannot run --workers 2"),
    }
    for name, (value, message) in refused.items():
        with pytest.raises(SettingsError, match=re.escape(message)):
            config_of("mqtt://h:1", secure_aggregation=True, **{name: value})
    with pytest.raises(SettingsError, match="cannot run --clip-action reject"):
        config_of("mqtt://h:1", secure_aggregation=True, clip_norm="1", clip_action="reject")
    with pytest.raises(SettingsError, match=r"aggregation median.*codec must be 'none', not 'q8'"):  # every refusal at once
        config_of("mqtt://h:1", secure_aggregation=True, aggregation="median", codec="q8")
    for bad in ({"degree": 7}, {"threshold": 1}, {"min_survivors": 2}, {"retries": -1}, {"mask_timeout": 0}, {"ring_bits": 4}):
        with pytest.raises(SettingsError, match="secagg"):
            config_of("mqtt://h:1", secure_aggregation=True, secagg=bad)


def test_a_refused_secure_combination_is_one_line_from_the_command_line() -> None:
    done = subprocess.run([sys.executable, "-m", "fedge", "aggregator", "--broker", "mqtt://127.0.0.1:1", "--secure-aggregation",
                           "--aggregation", "median", "--codec", "q8+zstd"], capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fedge aggregator: error: --secure-aggregation cannot run --aggregation median"), done.stderr
    assert "the update codec must be 'none', not 'q8+zstd'" in lines[0]
