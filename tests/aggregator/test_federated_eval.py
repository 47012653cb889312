"""Federated evaluation's reduction (aggregator/observability/federated_eval.py) against a hand computation."""

from __future__ import annotations

import pytest

from aggregator.observability.federated_eval import EvalCollector, eval_due, reduce_reports
from fedge_contract.cohort import EVAL_ALL, Participation, eval_threshold
from fedge_contract.evaluation import EvalReport


def _report(client: str, n: int, loss: float, acc: float, version: int = 4) -> EvalReport:
    return EvalReport("f", client, version, n, loss, acc)


def test_metrics_are_sample_weighted_as_computed_by_hand():
    reports = [_report("a", 10, 0.5, 0.9), _report("b", 30, 1.0, 0.6), _report("c", 60, 0.2, 0.95)]
    metrics = reduce_reports(reports)
    assert metrics is not None
    # loss: (10*0.5 + 30*1.0 + 60*0.2) / 100 = 47/100; accuracy: (9 + 18 + 57) / 100
    assert metrics.loss == pytest.approx(0.47)
    assert metrics.accuracy == pytest.approx(0.84)
    assert (metrics.devices, metrics.samples, metrics.model_version) == (3, 100, 4)
    assert metrics.accuracy_min == 0.6 and metrics.accuracy_p10 == 0.6
    assert metrics.as_metrics()["fed_accuracy"] == pytest.approx(0.84)
    assert reduce_reports([]) is None


def test_weighted_mean_equals_one_evaluation_over_the_union():
    """Accuracy of correct/total over pooled samples: 7/10 and 45/50 pool to 52/60."""
    metrics = reduce_reports([_report("a", 10, 0.3, 0.7), _report("b", 50, 0.1, 0.9)])
    assert metrics is not None and metrics.accuracy == pytest.approx(52 / 60)


def test_a_capped_weight_limits_a_device_that_claims_many_samples():
    reports = [_report("a", 10, 1.0, 0.9), _report("liar", 1_000_000, 0.0, 0.0)]
    capped = reduce_reports(reports, max_samples=10)
    assert capped is not None and capped.accuracy == pytest.approx(0.45) and capped.samples == 20
    with pytest.raises(ValueError):
        reduce_reports([_report("a", 1, 0, 1, version=1), _report("b", 1, 0, 1, version=2)])


def test_collector_keeps_one_asked_report_per_device_and_says_why_it_refuses():
    everyone = EvalCollector("f", 4, Participation(eval_threshold=EVAL_ALL))
    assert everyone.offer("a", _report("a", 10, 0.5, 0.9).to_bytes()) is None
    assert everyone.offer("a", _report("a", 10, 0.5, 0.9).to_bytes()).startswith("duplicate")
    assert everyone.offer("b", _report("a", 10, 0.5, 0.9).to_bytes()).startswith("client_mismatch")
    assert everyone.offer("c", _report("c", 10, 0.5, 0.9, version=3).to_bytes()).startswith("stale")
    assert everyone.offer("d", b"{not json").startswith("malformed")
    assert everyone.offer("e", _report("e", 10, 0.5, 0.9).to_bytes().replace(b'"accuracy":0.9', b'"accuracy":1.9')).startswith("bad_value")
    nobody = EvalCollector("f", 4, Participation(eval_threshold=0))
    assert nobody.offer("a", _report("a", 10, 0.5, 0.9).to_bytes()).startswith("not_invited")
    some = Participation(eval_threshold=eval_threshold(0.5))
    asked = [c for c in (f"d{i}" for i in range(40)) if some.asks_eval(c, fleet="f", model_version=4)]
    half = EvalCollector("f", 4, some)
    assert all(half.offer(c, _report(c, 5, 0.1, 1.0).to_bytes()) is None for c in asked)
    metrics = everyone.metrics()
    assert metrics is not None and metrics.devices == 1 and half.metrics().devices == len(asked)  # type: ignore[union-attr]


def test_eval_due_every_n_versions_and_the_final_one():
    assert [v for v in range(10) if eval_due(v, 3)] == [0, 3, 6, 9]
    assert eval_due(7, 3, final=True) and not eval_due(7, 0, final=True)
    with pytest.raises(ValueError):
        eval_due(1, -1)
