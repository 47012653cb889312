"""A secure round's announcement: what the device needs beyond the Setup, read strictly from task.extra."""

from __future__ import annotations

import numpy as np
import pytest

from fedge_contract import GlobalModel, TaskConfig
from fedge_contract.errors import DecodeError, Reason
from fedge_contract.secagg import ParameterError
from fedge_contract.secagg.announcement import EXTRA_KEY, SecureRound
from fedge_contract.secagg.topics import MaskedChunk, SecAggTopics


def test_the_parameters_survive_the_global_model_s_wire_format() -> None:
    secure = SecureRound(max_weight=500, clip_norm=2.5)
    model = GlobalModel("lab", 3, 4, None, TaskConfig(codec="none", extra=secure.to_extra()), "f" * 16, ())
    again = GlobalModel.from_bytes(model.to_bytes(), max_bytes=1 << 20)
    assert SecureRound.of(again.task) == secure
    assert SecureRound.of(TaskConfig()) is None  # a plain round


@pytest.mark.parametrize(("extra", "reason"), [
    ("yes", Reason.WRONG_TYPE),
    ({"clip_norm": None}, Reason.WRONG_TYPE),
    ({"max_weight": True}, Reason.WRONG_TYPE),
    ({"max_weight": 0}, Reason.BAD_VALUE),
    ({"max_weight": 10, "clip_norm": "big"}, Reason.WRONG_TYPE),
    ({"max_weight": 10, "clip_norm": -1.0}, Reason.BAD_VALUE),
    ({"max_weight": 10, "clip_norm": float("inf")}, Reason.BAD_VALUE),
])
def test_malformed_parameters_are_refused_with_a_reason(extra: object, reason: Reason) -> None:
    with pytest.raises(DecodeError) as caught:
        SecureRound.of(TaskConfig(extra={EXTRA_KEY: extra}))
    assert caught.value.reason is reason


def test_the_device_side_l2_bound_scales_only_deltas_beyond_it() -> None:
    delta = np.full(4, 3.0)  # norm 6
    assert np.allclose(SecureRound(clip_norm=3.0).bounded(delta), 1.5)
    assert np.allclose(SecureRound(clip_norm=10.0).bounded(delta), 3.0)
    assert np.allclose(SecureRound().bounded(delta), 3.0)
    with pytest.raises(ParameterError):
        SecureRound(max_weight=0)


def test_masked_input_chunk_topics() -> None:
    topics = SecAggTopics("lab")
    base = topics.masked_chunks("agent-3", "s1")
    assert base == "fl/lab/secagg/up/masked/agent-3/s1"
    assert topics.parse_masked_chunk(f"{base}/12") == MaskedChunk("agent-3", "s1", 12)
    for topic in (f"{base}/012", f"{base}/x", base, "fl/other/secagg/up/masked/agent-3/s1/0", "fl/lab/secagg/up/shares/agent-3/s1/0",
                  "fl/lab/secagg/up/masked/a+b/s1/0"):
        assert topics.parse_masked_chunk(topic) is None
    assert topics.parse_device(f"{base}/0") is None  # a chunk is never mistaken for a whole message
    assert topics.for_device("agent-3") == [topics.setup, topics.unmask, topics.keys("agent-3"), topics.bundle("agent-3")]
