"""The proposed secure-aggregation topics: one decoder per device topic, the client id in the last level."""

from __future__ import annotations

import pytest

from fedge_contract.secagg import KeyAdvert, MaskedInput, Reveal, Shares
from fedge_contract.secagg.topics import DeviceTopic, SecAggTopics


def test_topic_names() -> None:
    topics = SecAggTopics("lab")
    assert topics.setup == "fl/lab/secagg/down/setup" and topics.unmask == "fl/lab/secagg/down/unmask"
    assert topics.keys("agent-3") == "fl/lab/secagg/down/keys/agent-3"
    assert topics.bundle("agent-3") == "fl/lab/secagg/down/bundle/agent-3"
    assert topics.device(MaskedInput, "agent-3") == "fl/lab/secagg/up/masked/agent-3"
    assert topics.all_from_devices == "fl/lab/secagg/up/+/+"


@pytest.mark.parametrize("kind", [KeyAdvert, Shares, MaskedInput, Reveal])
def test_every_device_topic_parses_back_to_its_message_type(kind: type) -> None:
    topics = SecAggTopics("lab")
    assert topics.parse_device(topics.device(kind, "agent-3")) == DeviceTopic(kind, "agent-3")


@pytest.mark.parametrize(
    "topic",
    ["fl/other/secagg/up/masked/agent-3", "fl/lab/secagg/up/unknown/agent-3", "fl/lab/secagg/down/keys/agent-3",
     "fl/lab/secagg/up/masked/agent-3/0", "fl/lab/secagg/up/masked/a b", "fl/lab/updates/agent-3"],
)
def test_other_topics_are_not_device_topics(topic: str) -> None:
    assert SecAggTopics("lab").parse_device(topic) is None


def test_names_that_would_escape_a_topic_level_are_refused() -> None:
    with pytest.raises(ValueError):
        SecAggTopics("a/b")
    with pytest.raises(ValueError):
        SecAggTopics("lab").keys("+")
