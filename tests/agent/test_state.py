"""What an agent remembers across restarts: the last version trained on, the fingerprint, the count
of updates it dropped unanswered."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from edge_agent.state import AgentState


def test_missing_file_gives_defaults(tmp_path: Path) -> None:
    assert AgentState.load(tmp_path / "state.json") == AgentState(trained_version=-1, fingerprint="")


def test_save_and_load(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    AgentState(trained_version=12, fingerprint="0123abcd", dropped_updates=3).save(path)
    assert json.loads(path.read_text()) == {"trained_version": 12, "fingerprint": "0123abcd", "dropped_updates": 3}
    assert AgentState.load(path) == AgentState(12, "0123abcd", 3)
    assert os.listdir(tmp_path) == ["state.json"]  # atomic write: no temp file left


def test_save_overwrites(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    state = AgentState()
    for version in range(3):
        state.trained_version = version
        state.save(path)
    assert AgentState.load(path).trained_version == 2


def test_missing_fingerprint_is_empty(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    path.write_text('{"trained_version": 4}')
    assert AgentState.load(path) == AgentState(4, "")


def test_a_state_from_before_the_dropped_count_counts_none(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    path.write_text('{"trained_version": 4, "fingerprint": "ab"}')
    assert AgentState.load(path).dropped_updates == 0
    path.write_text('{"trained_version": 4, "fingerprint": "ab", "dropped_updates": -5}')
    assert AgentState.load(path) == AgentState(4, "ab", 0)


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b"{",
        b"not json",
        b"\xff\xfe\x00garbage",  # not UTF-8
        b"[]",
        b'"a string"',
        b"null",
        b"{}",
        b'{"trained_version": null}',
        b'{"trained_version": "seven"}',
        b'{"trained_version": NaN}',
        b'{"fingerprint": "abc"}',
    ],
)
def test_corrupt_file_gives_defaults(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "state.json"
    path.write_bytes(content)
    assert AgentState.load(path) == AgentState()


@pytest.mark.parametrize("content", [b'{"trained_version": Infinity}', b'{"trained_version": 1e999}'])
def test_infinite_version_gives_defaults(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "state.json"
    path.write_bytes(content)
    assert AgentState.load(path) == AgentState()
