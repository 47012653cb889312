"""Federated evaluation in the round loop (observability/evaluations.py): which announcements ask,
which reports count, and figures merged into their rounds' stored metrics."""

from __future__ import annotations

import pytest

from aggregator.observability.evaluations import Evaluations
from aggregator.observability.metrics import AggregatorMetrics
from aggregator.store import InlineStore, Store
from fedge_contract import Presence
from fedge_contract.evaluation import EvalReport

pytestmark = pytest.mark.asyncio


def report(client: str, version: int, samples: int, accuracy: float, loss: float = 0.5) -> bytes:
    return EvalReport("f", client, version, samples, loss, accuracy).to_bytes()


async def test_reports_become_their_rounds_figures(tmp_path):
    now = [0.0]
    metrics = AggregatorMetrics()
    evaluations = Evaluations("f", 2, 1.0, metrics, clock=lambda: now[0])
    assert evaluations.ask(1) is None and evaluations.ask(2) is not None and evaluations.ask(3, final=True) is not None
    evaluations.offer("a", report("a", 2, 30, 0.9, 0.2))
    evaluations.offer("b", report("b", 2, 10, 0.5, 0.6))
    evaluations.offer("b", report("b", 2, 10, 0.5))  # duplicate
    evaluations.offer("c", report("c", 1, 10, 0.5))  # version 1 was not asked
    evaluations.offer("c", report("d", 2, 10, 0.5))  # on another device's topic
    evaluations.offer("c", b"{not json")
    assert evaluations.latest["fed_accuracy"] == pytest.approx((30 * 0.9 + 10 * 0.5) / 40)
    assert evaluations.latest["fed_loss"] == pytest.approx((30 * 0.2 + 10 * 0.6) / 40) and evaluations.latest["fed_version"] == 2
    registry = metrics.registry
    assert registry.get_sample_value("fedge_evals_total", {"status": "accepted", "reason": ""}) == 2
    for reason in ("duplicate", "stale", "client_mismatch"):
        assert registry.get_sample_value("fedge_evals_total", {"status": "refused", "reason": reason}) == 1, reason
    assert registry.get_sample_value("fedge_federated_devices") == 2
    assert not evaluations.due()  # FLUSH_EVERY not passed yet
    now[0] = 10.0
    assert evaluations.due()
    with Store(tmp_path / "s.sqlite") as store:
        store.open_round(2, 1, None)
        store.close_round(2, 2, "fp", {}, {}, 2, {"accuracy": 0.7})
        await evaluations.flush(InlineStore(store))
        [row] = store.rounds()
    assert row["metrics"]["accuracy"] == 0.7 and row["metrics"]["fed_accuracy"] == pytest.approx(0.8)
    assert not evaluations.due()
    devices = {c: Presence("f", c, "online") for c in ("a", "b", "e")} | {"z": Presence("f", "z", "offline")}
    assert evaluations.awaited(2, devices) == {"e"} and evaluations.awaited(3, devices) == {"a", "b", "e"}
