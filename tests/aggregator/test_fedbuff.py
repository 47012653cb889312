"""FedBuff rules as pure logic: staleness weights, admission, buffer flushes, the weighted mean."""

from __future__ import annotations

import math

import numpy as np
import pytest

from aggregator.aggregation.fold import WeightedSum, scaled
from aggregator.errors import Rejection
from aggregator.rounds.buffered import Buffer, BufferPlan, open_buffer, staleness_function
from aggregator.rounds.policy import Accepted
from fedge_contract import ReceiptStatus, Update
from fedge_contract.tensors import ModelSpec


def update(client: str, uid: str, base: int, samples: int = 10) -> Update:
    return Update("f", client, uid, base + 1, base, samples, ())


def never(_: str) -> bool:
    return False


def buffer_on(version: int, *, size: int = 3, max_staleness: int = 2, staleness: str = "sqrt") -> Buffer:
    return open_buffer(version, BufferPlan(size, max_staleness), staleness_function(staleness))


def test_staleness_functions() -> None:
    sqrt = staleness_function("sqrt")
    assert [sqrt(s) for s in (0, 3, 8)] == [1.0, 0.5, 1 / 3]
    assert staleness_function("constant")(7) == 1.0
    assert staleness_function("poly:1")(4) == 0.2
    assert staleness_function("poly:0.5")(3) == 0.5
    for bad in ("linear", "poly:", "poly:-1", "poly:nan", "poly:x"):
        with pytest.raises(ValueError, match="staleness"):
            staleness_function(bad)


def test_admission_by_staleness() -> None:
    buf = buffer_on(5, max_staleness=2)
    assert buf.number == 6 and buf.deadline is None
    assert buf.admit(update("a", "u1", 5), never) == 1.0
    assert buf.admit(update("a", "u2", 4), never) == pytest.approx(1 / math.sqrt(2))
    assert buf.admit(update("a", "u3", 3), never) == pytest.approx(1 / math.sqrt(3))
    with pytest.raises(Rejection) as stale:
        buf.admit(update("a", "u4", 2), never)
    assert stale.value.status is ReceiptStatus.STALE and "max_staleness 2" in stale.value.reason
    with pytest.raises(Rejection) as ahead:
        buf.admit(update("a", "u5", 6), never)
    assert ahead.value.status is ReceiptStatus.REJECTED


def test_dedupe_by_update_id_and_by_client_and_base_version() -> None:
    buf = buffer_on(5)
    buf.record(Accepted("a", "u1", 4))
    for again, reason in ((update("b", "u1", 5), "already accepted"), (update("a", "u9", 4), "already contributed")):
        with pytest.raises(Rejection) as dup:
            buf.admit(again, never)
        assert dup.value.status is ReceiptStatus.DUPLICATE and reason in dup.value.reason
    with pytest.raises(Rejection, match="already accepted"):
        buf.admit(update("c", "old", 5), lambda uid: uid == "old")  # accepted in an earlier buffer (the store)
    assert buf.admit(update("a", "u2", 5), never) == 1.0  # same client, another base version: fine


def test_buffer_flushes_every_buffer_size_and_the_window_slides() -> None:
    buf = buffer_on(0, size=2, max_staleness=1)
    published = []
    arrivals = [("a", 0), ("b", 0), ("a", 0), ("c", 0), ("a", 1), ("b", 1), ("c", 1), ("a", 2)]
    for i, (client, base) in enumerate(arrivals):
        try:
            buf.admit(update(client, f"u{i}", base), never)
        except Rejection as rejection:
            published.append(("rejected", client, base, rejection.status.value))
            continue
        buf.record(Accepted(client, f"u{i}", base))
        if buf.complete:
            published.append(("flush", buf.number, buf.staleness_sum, buf.staleness_max))
            buf = buf.next()
    assert published == [
        ("flush", 1, 0, 0),  # a, b on v0
        ("rejected", "a", 0, "duplicate"),  # a already contributed an update trained on v0
        ("flush", 2, 1, 1),  # c on v0 (s=1), a on v1 (s=0)
        ("flush", 3, 2, 1),  # b, c on v1 (s=1 each)
    ]
    assert buf.base_version == 3 and buf.accepted == 1
    # the dedupe window keeps only base versions still admissible (>= 3 - 1)
    assert buf.contributed == {("a", 2)}
    with pytest.raises(Rejection) as stale:
        buf.admit(update("c", "late", 0), never)
    assert stale.value.status is ReceiptStatus.STALE


def test_restart_restores_the_window() -> None:
    buf = open_buffer(4, BufferPlan(3, 1), staleness_function("sqrt"), [("a", 2), ("a", 3), ("b", 4)])
    assert buf.contributed == {("a", 3), ("b", 4)}
    with pytest.raises(Rejection, match="already contributed"):
        buf.admit(update("a", "new", 3), never)


def test_weighted_mean_by_hand() -> None:
    """Current v3; updates (n=10, s=0, delta 1), (n=30, s=3, delta 2), (n=20, s=8, delta -3).

    f = 1/sqrt(1+s) = 1, 1/2, 1/3; sum n f delta = 10*1 + 30*0.5*2 + 20*(1/3)*(-3) = 10 + 30 - 20 = 20;
    divided by sum n = 60: 1/3. (Normalising by sum n f = 10 + 15 + 20/3 would give 0.6315...)
    """
    buf = buffer_on(8, max_staleness=8)
    acc = WeightedSum(ModelSpec.of({"w": np.zeros(2, np.float32)}))
    for i, (n, base, d) in enumerate(((10, 8, 1.0), (30, 5, 2.0), (20, 0, -3.0))):
        factor = buf.admit(update(f"c{i}", f"u{i}", base, n), never)
        acc.add(scaled({"w": np.array([d, 2 * d], np.float32)}, factor), n)
        buf.record(Accepted(f"c{i}", f"u{i}", base))
    np.testing.assert_allclose(acc.mean()["w"], [1 / 3, 2 / 3], rtol=1e-6)
    assert (buf.staleness_sum, buf.staleness_max) == (11, 8)


def test_plan_validation() -> None:
    with pytest.raises(ValueError):
        BufferPlan(0, 1)
    with pytest.raises(ValueError):
        BufferPlan(1, -1)
