"""Norm bounding (fixed, adaptive, clip, reject) and weight capping."""

from __future__ import annotations

import numpy as np
import pytest
from numpy.testing import assert_allclose

from aggregator.aggregation.clipping import NormBound, capped_weight, l2_norm
from aggregator.errors import Rejection


def _delta(*values: float) -> dict[str, np.ndarray]:
    return {"a": np.array(values[:1], np.float32), "b": np.array(values[1:], np.float32)}


def test_l2_norm_spans_all_tensors():
    assert l2_norm(_delta(3.0, 4.0)) == pytest.approx(5.0)


def test_fixed_bound_clips_onto_the_bound_and_keeps_the_direction():
    bound = NormBound(clip_norm=1.0)
    clipped = bound.apply(_delta(3.0, 4.0))
    assert_allclose(clipped["a"], [0.6], rtol=1e-6)
    assert_allclose(clipped["b"], [0.8], rtol=1e-6)
    small = _delta(0.3, 0.4)
    assert bound.apply(small) is small  # within the bound: untouched
    assert bound.round_stats() == {"clipped": 1.0, "update_norm_median": pytest.approx(2.75), "clip_bound": 1.0}


def test_reject_mode_refuses_with_a_reason_and_refold_only_clips():
    bound = NormBound(clip_norm=1.0, action="reject")
    with pytest.raises(Rejection) as caught:
        bound.apply(_delta(3.0, 4.0))
    assert caught.value.reason.startswith("norm_bound: update norm 5 exceeds the bound 1")
    assert l2_norm(bound.apply(_delta(3.0, 4.0), strict=False)) == pytest.approx(1.0)


def test_adaptive_bound_follows_the_median_of_recent_norms_after_warmup():
    bound = NormBound(factor=2.0, warmup=3)
    for norm in (1.0, 2.0):
        bound.apply(_delta(norm, 0.0))
    assert bound.bound() is None  # warm-up: nothing known yet
    bound.apply(_delta(100.0, 0.0))  # the third one passes unbounded
    assert bound.bound() == pytest.approx(4.0)  # 2 x median(1, 2, 100)
    clipped = bound.apply(_delta(0.0, 50.0))
    assert l2_norm(clipped) == pytest.approx(4.0)
    assert bound.bound() == pytest.approx(2.0 * 26.0)  # median(1, 2, 50, 100) = 26: pre-clip norms are recorded


def test_adaptive_bound_with_a_warmup_bound():
    bound = NormBound(clip_norm=3.0, factor=2.0, warmup=10)
    assert l2_norm(bound.apply(_delta(10.0, 0.0))) == pytest.approx(3.0)


@pytest.mark.parametrize("kwargs", [{"clip_norm": 0.0}, {"clip_norm": float("inf")}, {"factor": 0.5}, {"action": "drop"}])
def test_bad_settings_are_refused(kwargs):
    with pytest.raises(ValueError):
        NormBound(**kwargs)


def test_capped_weight():
    assert capped_weight(500, None) == 500.0
    assert capped_weight(500, 100) == 100.0
    assert capped_weight(50, 100) == 50.0
