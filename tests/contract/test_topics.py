"""Topic names of a fleet (DESIGN.md, Topics)."""

from __future__ import annotations

import pytest

from fedge_contract.topics import Topics, check_name


def test_topic_names() -> None:
    topics = Topics("lab-1")
    assert topics.prefix == "fl/lab-1"
    assert topics.global_model == "fl/lab-1/global"
    assert topics.status == "fl/lab-1/status"
    assert topics.all_updates == "fl/lab-1/updates/+"
    assert topics.all_presence == "fl/lab-1/presence/+"
    assert topics.update("agent-7") == "fl/lab-1/updates/agent-7"
    assert topics.receipt("agent-7") == "fl/lab-1/receipts/agent-7"
    assert topics.presence("agent_7.a") == "fl/lab-1/presence/agent_7.a"


def test_default_fleet() -> None:
    assert Topics().global_model == "fl/default/global"


@pytest.mark.parametrize("name", ["", "a/b", "+", "#", "a+", "x#", "has space", "é", "x" * 65])
def test_bad_names_are_refused(name: str) -> None:
    with pytest.raises(ValueError):
        check_name("client id", name)
    with pytest.raises(ValueError):
        Topics(name)
    with pytest.raises(ValueError):
        Topics("ok").update(name)


def test_name_of_64_characters_is_fine() -> None:
    assert check_name("fleet", "x" * 64) == "x" * 64


@pytest.mark.parametrize(
    "topic, client",
    [
        ("fl/f/updates/agent-1", "agent-1"),
        ("fl/f/presence/agent-2", "agent-2"),
        ("fl/f/receipts/agent-3", "agent-3"),
        ("fl/g/updates/agent-1", None),  # another fleet
        ("fl/f/global", None),
        ("fl/f/status", None),
        ("fl/f/updates/a/b", None),
        ("fl/f/updates/", None),
        ("fl/f/other/agent-1", None),
        ("xx/f/updates/agent-1", None),
        ("fl/f/updates/bad+id", None),
    ],
)
def test_client_of(topic: str, client: str | None) -> None:
    assert Topics("f").client_of(topic) == client


def test_client_of_inverts_update() -> None:
    topics = Topics("f")
    assert topics.client_of(topics.update("agent-42")) == "agent-42"


def test_chunk_topics() -> None:
    topics = Topics("f")
    assert topics.global_chunks(7) == "fl/f/global/7"
    assert topics.update_chunks("agent-1", "u_1-x") == "fl/f/updates/agent-1/u_1-x"
    with pytest.raises(ValueError):
        topics.update_chunks("agent-1", "a/b")
    with pytest.raises(ValueError):
        topics.global_chunks(-1)


@pytest.mark.parametrize(
    "topic, base, index",
    [
        ("fl/f/global/7/0", "fl/f/global/7", 0),
        ("fl/f/global/0/31", "fl/f/global/0", 31),
        ("fl/f/updates/agent-1/u1/2", "fl/f/updates/agent-1/u1", 2),
        ("fl/f/global/7/05", None, None),  # not canonical: would name chunk 5 twice
        ("fl/f/global/07/5", None, None),
        ("fl/f/global/x/5", None, None),
        ("fl/f/global/7/-1", None, None),
        ("fl/f/global/7", None, None),
        ("fl/g/global/7/0", None, None),  # another fleet
        ("fl/f/updates/agent-1/2", None, None),
        ("fl/f/updates/agent-1/u1/2/3", None, None),
        ("fl/f/presence/agent-1/u1/2", None, None),
        ("fl/f/updates/bad+id/u1/2", None, None),
        ("$fedge/chunks/expired", None, None),
        # the catch-up sets of delta broadcasts (fedge_contract.broadcast)
        ("fl/f/global/key/4/0", "fl/f/global/key/4", 0),
        ("fl/f/global/delta/5/12", "fl/f/global/delta/5", 12),
        ("fl/f/global/key", None, None),  # the keyframe itself
        ("fl/f/global/delta/5", None, None),  # a retained delta itself, not a chunk of anything
        ("fl/f/global/key/4", None, None),
        ("fl/f/global/delta/05/1", None, None),
        ("fl/f/global/other/5/1", None, None),
        ("fl/f/global/key/4/1/2", None, None),
    ],
)
def test_chunk_of(topic: str, base: str | None, index: int | None) -> None:
    found = Topics("f").chunk_of(topic)
    assert (found.base, found.index) == (base, index) if found else base is None


def test_catch_up_topics_of_delta_broadcasts() -> None:
    topics = Topics("f")
    assert topics.global_keyframe == "fl/f/global/key"
    assert topics.global_delta(5) == "fl/f/global/delta/5"
    assert topics.keyframe_chunks(4) == "fl/f/global/key/4"
    with pytest.raises(ValueError):
        topics.global_delta(0)  # a delta makes version 1 at the earliest
    with pytest.raises(ValueError):
        topics.keyframe_chunks(-1)
