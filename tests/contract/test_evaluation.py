"""EvalReport: strict decoding of a device's evaluation report."""

from __future__ import annotations

import json

import pytest

from fedge_contract import DecodeError, Topics
from fedge_contract.evaluation import EvalReport


def test_report_round_trips_as_small_json():
    report = EvalReport("f", "agent-3", 7, 18, 0.25, 0.875, 0.04)
    payload = report.to_bytes()
    assert EvalReport.from_bytes(payload, fleet="f") == report
    assert len(payload) < 200
    assert json.loads(payload)["type"] == "eval"


@pytest.mark.parametrize("change, reason", [
    ({"num_samples": 0}, "bad_value"),
    ({"num_samples": 1.5}, "wrong_type"),
    ({"loss": -0.1}, "bad_value"),
    ({"accuracy": 1.01}, "bad_value"),
    ({"accuracy": "high"}, "wrong_type"),
    ({"model_version": -1}, "bad_value"),
    ({"seconds": -1}, "bad_value"),
    ({"fleet": "other"}, "wrong_fleet"),
    ({"type": "update"}, "wrong_type"),
])
def test_a_bad_report_is_refused_with_a_reason(change, reason):
    body = json.loads(EvalReport("f", "agent-3", 7, 18, 0.25, 0.875).to_bytes())
    body.update(change)
    with pytest.raises(DecodeError) as info:
        EvalReport.from_bytes(json.dumps(body).encode(), fleet="f")
    assert info.value.reason.value == reason


def test_non_finite_and_oversized_reports_are_refused():
    body = EvalReport("f", "agent-3", 7, 18, 0.25, 0.875).to_bytes().replace(b'"loss":0.25', b'"loss":NaN')
    with pytest.raises(DecodeError, match="malformed"):
        EvalReport.from_bytes(body, fleet="f")
    with pytest.raises(DecodeError, match="too_large"):
        EvalReport.from_bytes(b" " * 70_000, fleet="f")
    with pytest.raises(ValueError):
        EvalReport("f", "agent-3", 7, 18, float("inf"), 0.5)


def test_evals_topic_names_its_client():
    topics = Topics("f")
    assert topics.evals("agent-3") == "fl/f/evals/agent-3"
    assert topics.client_of(topics.evals("agent-3")) == "agent-3"
    assert topics.all_evals == "fl/f/evals/+"
    with pytest.raises(ValueError):
        topics.evals("a/b")
