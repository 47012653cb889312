"""fedge_runtime.settings on a small nested tree of its own: sources, precedence, flags, types, errors."""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from fedge_runtime.settings import Loader, SettingsError


@dataclass(frozen=True)
class Span:
    """A value with a syntax of its own: ``FROM-TO``."""

    low: int
    high: int

    @classmethod
    def parse(cls, text: str) -> Span:
        low, sep, high = text.partition("-")
        if not sep or not low.isdigit() or not high.isdigit():
            raise ValueError(f"span {text!r} must look like FROM-TO, e.g. 3-7")
        return cls(int(low), int(high))


@dataclass(frozen=True)
class Limits:
    max_bytes: int = field(default=1024, metadata={"help": "largest message, bytes"})
    ratio: float | None = field(default=0.5, metadata={"help": "share kept (none: all)"})

    def __post_init__(self) -> None:
        if self.ratio is not None and not 0 < self.ratio <= 1:
            raise ValueError(f"ratio must be in (0, 1], got {self.ratio}")


@dataclass(frozen=True)
class Rounds:
    deadline: float = field(default=60.0, metadata={"help": "seconds a round stays open"})
    target: int | None = field(default=None, metadata={"help": "updates that close a round"})
    evaluate: bool = field(default=True, metadata={"help": "evaluate each model", "flag": "--eval"})
    strategy: str = field(default="fedavg", metadata={"help": "server strategy"})
    limits: Limits = field(default_factory=Limits, metadata={"help": "limits"})


@dataclass(frozen=True)
class Service:
    broker: str = field(metadata={"help": "broker URL"})
    store: Path = field(default=Path("service.sqlite"), metadata={"help": "where state goes"})
    allow: frozenset[str] = field(default=frozenset(), metadata={"help": "client ids accepted"})
    options: Mapping[str, str] = field(default_factory=dict, metadata={"flag": "--opt", "help": "task option"})
    spans: tuple[Span, ...] = field(default=(), metadata={"flag": "--span", "parse": Span.parse, "help": "a span (repeatable)"})
    secret: str = field(default="", metadata={"cli": False, "help": "file or environment only"})
    internal: int = field(default=3, metadata={"setting": False})
    quiet: bool = field(default=False, metadata={"action": "store_true", "help": "say less"})
    rounds: Rounds = field(default_factory=Rounds, metadata={"help": "rounds"})


LOADER = Loader(Service)


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "service.toml"
    path.write_text(text)
    return path


def parse(*argv: str) -> dict[str, object]:
    parser = argparse.ArgumentParser(exit_on_error=False)
    LOADER.add_flags(parser)
    return LOADER.flag_values(parser.parse_args(list(argv)))


def test_keys_envs_and_flags_follow_the_tree():
    names = {s.key: (s.env, s.flag) for s in LOADER.settings}
    assert names["broker"] == ("FEDGE_BROKER", "--broker")
    assert names["rounds.deadline"] == ("FEDGE_ROUNDS_DEADLINE", "--deadline")
    assert names["rounds.limits.max_bytes"] == ("FEDGE_ROUNDS_LIMITS_MAX_BYTES", "--max-bytes")
    assert names["rounds.evaluate"][1] == "--eval" and names["secret"] == ("FEDGE_SECRET", None)
    assert "internal" not in names


def test_defaults_are_the_dataclasses_own():
    built = LOADER.build(LOADER.gather({"broker": "mqtt://h"}, environ={}))
    assert built == Service(broker="mqtt://h")
    assert built.rounds.limits == Limits() and built.internal == 3


def test_precedence_flags_over_environment_over_file_over_defaults(tmp_path):
    config = write(tmp_path, """
broker = "from-file"
store = "file.sqlite"
[rounds]
deadline = 10
strategy = "fedadam"
[rounds.limits]
max_bytes = 2048
""")
    env = {"FEDGE_STORE": "env.sqlite", "FEDGE_ROUNDS_DEADLINE": "20", "FEDGE_ROUNDS_LIMITS_RATIO": "none"}
    merged = LOADER.gather(parse("--deadline", "30", "--no-eval"), config_file=config, environ=env)
    built = LOADER.build(merged)
    assert built.broker == "from-file" and built.store == Path("env.sqlite")
    assert built.rounds == Rounds(deadline=30.0, evaluate=False, strategy="fedadam", limits=Limits(max_bytes=2048, ratio=None))
    assert merged.source("rounds.deadline") == "flag --deadline" and merged.source("store") == "FEDGE_STORE"
    assert merged.source("rounds.strategy") == str(config) and merged.source("rounds.target") == "default"


def test_config_file_from_the_environment(tmp_path):
    config = write(tmp_path, 'broker = "b"\nsecret = "s3"\n')
    assert LOADER.build(LOADER.gather({}, environ={"FEDGE_CONFIG": str(config)})).secret == "s3"


def test_generated_flags_types_and_repeats():
    given = parse("--broker", "h", "--opt", "a=1", "--opt", "b = two", "--span", "1-2", "--span", "5-9",
                  "--allow", "x", "--allow", "y", "--quiet", "--target", "none", "--max-bytes", "99")
    built = LOADER.build(LOADER.gather(given, environ={}))
    assert built.options == {"a": "1", "b": "two"} and built.spans == (Span(1, 2), Span(5, 9))
    assert built.allow == frozenset({"x", "y"}) and built.quiet is True
    assert built.rounds.target is None and built.rounds.limits.max_bytes == 99
    assert parse() == {}  # nothing given: lower sources decide


def test_hidden_fields_have_no_flag_and_help_shows_defaults():
    parser = argparse.ArgumentParser(exit_on_error=False)
    LOADER.add_flags(parser)
    with pytest.raises(SystemExit):
        parser.parse_args(["--secret", "x"])
    text = parser.format_help()
    assert "--internal" not in text and "seconds a round stays open (default 60.0)" in text
    assert "--eval, --no-eval" in text and "rounds:" in text  # a section's flags in a group titled by its help


def test_environment_strings_convert_to_every_type():
    env = {"FEDGE_BROKER": "b", "FEDGE_ALLOW": "a, b,c", "FEDGE_OPTIONS": "k=v,n=2", "FEDGE_SPANS": "1-2,3-4",
           "FEDGE_QUIET": "yes", "FEDGE_ROUNDS_EVALUATE": "off", "FEDGE_ROUNDS_TARGET": "7"}
    built = LOADER.build(LOADER.gather({}, environ=env))
    assert built.allow == frozenset("abc") and built.options == {"k": "v", "n": "2"} and built.spans == (Span(1, 2), Span(3, 4))
    assert built.quiet is True and built.rounds.evaluate is False and built.rounds.target == 7


def test_every_problem_is_named_with_its_source_in_one_error(tmp_path):
    config = write(tmp_path, """
strategy = "top-level typo"
[rounds]
evaluate = "perhaps"
[rounds.limits]
max_byte = 1
""")
    env = {"FEDGE_ROUNDS_TARGET": "ten", "FEDGE_SPANS": "7"}
    with pytest.raises(SettingsError) as caught:
        LOADER.build(LOADER.gather({}, config_file=config, environ=env))
    problems = caught.value.problems
    top = next(p for p in problems if p.startswith(f"{config}: unknown setting(s) strategy (known: "))
    assert "broker" in top and "[rounds]" in top and "internal" not in top
    assert f"rounds.evaluate (from {config}) must be true or false, got 'perhaps'" in problems
    assert any(p.startswith(f"{config}: unknown setting(s) rounds.limits.max_byte") for p in problems)
    assert "rounds.target (from FEDGE_ROUNDS_TARGET) must be an integer or none, got 'ten'" in problems
    assert "spans (from FEDGE_SPANS): span '7' must look like FROM-TO, e.g. 3-7" in problems
    assert problems[-1].startswith("missing setting(s) broker: set broker by --broker, FEDGE_BROKER or `broker = ...`")
    assert str(caught.value) == "; ".join(problems)


def test_a_dataclass_check_names_where_the_value_came_from():
    with pytest.raises(SettingsError, match=r"ratio must be in \(0, 1\], got 3.0 \(rounds.limits.ratio from FEDGE_ROUNDS_LIMITS_RATIO\)"):
        LOADER.build(LOADER.gather({"broker": "b"}, environ={"FEDGE_ROUNDS_LIMITS_RATIO": "3"}))


def test_file_problems(tmp_path):
    with pytest.raises(SettingsError, match="cannot read the config file"):
        LOADER.build(LOADER.gather({}, config_file=tmp_path / "missing.toml", environ={}))
    with pytest.raises(SettingsError, match="is not valid TOML"):
        LOADER.build(LOADER.gather({}, config_file=write(tmp_path, "broker = \n"), environ={}))
    with pytest.raises(SettingsError, match=r"`rounds` must be a table \(\[rounds\]\)"):
        LOADER.build(LOADER.gather({}, config_file=write(tmp_path, 'broker = "b"\nrounds = 3\n'), environ={}))


def test_merged_values_can_be_inspected_before_validation():
    merged = LOADER.gather({"rounds": {"deadline": "5"}}, environ={"FEDGE_ROUNDS_LIMITS_RATIO": "2"})
    assert merged.get("broker") is None and merged.get("rounds.deadline") == 5.0 and merged.get("store") == Path("service.sqlite")
    assert merged.given("rounds") == {"deadline": 5.0} and merged.given("rounds.limits") == {"ratio": 2.0}
    assert merged.problems == []  # converted fine; only build() validates


def test_a_caller_may_build_a_section_itself():
    merged = LOADER.gather({"broker": "b"}, environ={"FEDGE_ROUNDS_DEADLINE": "5"})
    built = LOADER.build(merged, replace={"rounds": Rounds(strategy="mine")})
    assert built.rounds == Rounds(strategy="mine")


def test_unknown_programmatic_flag_is_a_problem():
    with pytest.raises(SettingsError, match="unknown flag setting 'brokr'"):
        LOADER.build(LOADER.gather({"broker": "b", "brokr": "x"}, environ={}))
