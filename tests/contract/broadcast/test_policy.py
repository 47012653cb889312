"""The catch-up bound holds on every run the encoder can make."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from fedge_contract.broadcast import BroadcastEncoder, BroadcastPolicy, worst_case_catch_up_bytes
from tests.contract.broadcast.helpers import SPEC, initial, walk

ENVELOPE = 300


def test_the_bound_is_the_smaller_of_the_count_and_the_weight_limits() -> None:
    assert worst_case_catch_up_bytes(1000, 100, BroadcastPolicy(every=5, ratio=None)) == 1000 + 4 * 100
    assert worst_case_catch_up_bytes(1000, 100, BroadcastPolicy(every=50, ratio=0.5)) == 1000 + 500 + 100
    assert worst_case_catch_up_bytes(1000, 100, BroadcastPolicy(every=3, ratio=0.5)) == 1000 + 2 * 100
    # with an envelope of 10 bytes on every message: the keyframe's, and each of at most every - 1 deltas'
    assert worst_case_catch_up_bytes(1000, 100, BroadcastPolicy(every=5, ratio=None), 10) == 1010 + 4 * 110
    assert worst_case_catch_up_bytes(1000, 100, BroadcastPolicy(every=50, ratio=0.5), 10) == 1010 + 500 + 100 + 49 * 10


@settings(max_examples=40, deadline=None)
@given(
    chain=st.sampled_from(["flat+topk:0.05+q4+zstd", "flat+topk:0.05+rice+sign", "q8+zstd", "f16", "none"]),
    keyframe_chain=st.sampled_from(["flat+zstd", "q8+zstd"]),
    every=st.integers(1, 12),
    ratio=st.sampled_from([None, 0.1, 0.5, 3.0]),
    scales=st.lists(st.sampled_from([1e-5, 1e-3, 1e-1]), min_size=1, max_size=30),
)
def test_what_a_new_device_downloads_never_exceeds_the_bound(
    chain: str, keyframe_chain: str, every: int, ratio: float | None, scales: list[float]
) -> None:
    policy = BroadcastPolicy(chain=chain, keyframe_chain=keyframe_chain, every=every, ratio=ratio)
    rng, true = np.random.default_rng(0), initial()
    encoder = BroadcastEncoder(SPEC, policy)
    encoder.begin(true, 0, devices_hold=True)
    largest = 0
    for version, scale in enumerate(scales, start=1):
        true = walk(true, rng, scale)
        step = encoder.advance(true, version)
        largest = max(largest, step.broadcast.nbytes)
        need = encoder.keyframe.nbytes + sum(b.nbytes for b in encoder.retained)  # keyframe + deltas k+1 .. v
        assert len(encoder.retained) <= every - 1
        assert need <= worst_case_catch_up_bytes(encoder.keyframe.nbytes, largest, policy)
        with_envelopes = need + ENVELOPE * (1 + len(encoder.retained))  # as whole messages
        assert with_envelopes <= worst_case_catch_up_bytes(encoder.keyframe.nbytes, largest, policy, ENVELOPE)
