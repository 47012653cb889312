"""Structured logs: one JSON object per line, with the fields the code attaches."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

from fedge_runtime.logs import JsonFormatter, setup_logging


def _record(msg: str, *args: object, extra: dict | None = None, level: int = logging.WARNING, exc_info=None) -> logging.LogRecord:
    record = logging.getLogger("fedge.aggregator").makeRecord(
        "fedge.aggregator", level, __file__, 1, msg, args, exc_info, extra=extra
    )
    return record


def test_json_line_has_the_core_keys_and_the_extra_fields() -> None:
    record = _record("receipt round=%d client=%s", 3, "phone-1",
                     extra={"round": 3, "client": "phone-1", "update": "u-1", "status": "rejected", "reason": "non_finite: x", "path": Path("/a")})
    line = JsonFormatter().format(record)
    assert "\n" not in line
    entry = json.loads(line)
    assert entry["level"] == "warning" and entry["logger"] == "fedge.aggregator"
    assert entry["message"] == "receipt round=3 client=phone-1"
    assert entry["ts"].endswith("Z") and entry["ts"][:2] == "20"
    assert {k: entry[k] for k in ("round", "client", "update", "status", "reason")} == {
        "round": 3, "client": "phone-1", "update": "u-1", "status": "rejected", "reason": "non_finite: x"}
    assert entry["path"] == "/a"  # not JSON-native: its str
    assert "args" not in entry and "msg" not in entry and "levelno" not in entry  # only what a reader needs


def test_exceptions_stay_on_one_line() -> None:
    try:
        raise ValueError("boom\nsecond line")
    except ValueError:
        record = _record("failed", level=logging.ERROR, exc_info=sys.exc_info())
    line = JsonFormatter().format(record)
    assert "\n" not in line
    assert "ValueError: boom" in json.loads(line)["exc"]


def test_setup_logging_json_writes_lines_to_the_file(tmp_path: Path) -> None:
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        setup_logging("info", tmp_path / "log.jsonl", json=True)
        logging.getLogger("fedge.agent").info("%s: trained round %d", "a-1", 2, extra={"client": "a-1", "round": 2})
        logging.getLogger("fedge.agent").debug("not at info")
        for handler in root.handlers:
            handler.flush()
        lines = (tmp_path / "log.jsonl").read_text().splitlines()
    finally:
        for handler in root.handlers:
            handler.close()
        root.handlers[:], level = saved
        root.setLevel(level)
    assert [json.loads(line)["message"] for line in lines] == ["a-1: trained round 2"]
    assert json.loads(lines[0])["client"] == "a-1"
