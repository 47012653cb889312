"""The cohort announcement: a Golomb-coded set of invited ids and a hash rule for evaluators."""

from __future__ import annotations

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedge_contract import DecodeError, GlobalModel, TaskConfig
from fedge_contract.cohort import EVAL_ALL, InviteSet, Participation, eval_threshold, invite_bits

IDS = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789._-", min_size=1, max_size=64)


@settings(max_examples=60, deadline=None)
@given(invited=st.sets(IDS, max_size=300), others=st.sets(IDS, max_size=50), round_no=st.integers(0, 2**40), bits=st.integers(1, 24))
def test_every_invited_id_is_found_and_the_set_survives_the_wire(invited, others, round_no, bits):
    invite = InviteSet.of(invited, fleet="f", round_no=round_no, bits=bits)
    wire = msgpack.unpackb(msgpack.packb(Participation(invite).to_wire(), use_bin_type=True), raw=False)
    decoded = Participation.from_wire(wire)
    assert decoded.invited == invite
    assert all(decoded.invites(c, fleet="f", round_no=round_no) for c in invited)  # no false negatives, ever
    assert invite.hashes() == sorted(invite.hashes())


def test_false_invitations_match_the_rice_parameter():
    """Outsiders match with probability 2**-bits: at 8 bits, ~1/256 of 20,000 outsiders per round."""
    invited = [f"agent-{i}" for i in range(0, 600, 3)]
    outsiders = [f"other-{i}" for i in range(20_000)]
    invite = InviteSet.of(invited, fleet="f", round_no=7, bits=8)
    false = sum(invite.contains(c, fleet="f", round_no=7) for c in outsiders)
    assert 40 < false < 120  # expected 78
    # the hash is keyed by round and fleet: the same ids are other hashes in another round or fleet
    assert InviteSet.of(invited, fleet="f", round_no=8, bits=8).data != invite.data
    assert InviteSet.of(invited, fleet="g", round_no=7, bits=8).data != invite.data


def test_bytes_at_ten_thousand_devices():
    """260 invited of 10,000 (target 200 x 1.3): p = 20, ~700 bytes, whatever the ids look like."""
    bits = invite_bits(10_000)
    assert bits == 20
    short = InviteSet.of([f"agent-{i}" for i in range(260)], fleet="f", round_no=1, bits=bits)
    long = InviteSet.of([f"device-{i:04d}-6f1c2a94-6a5e-4c2e-9a1b-{i:012d}" for i in range(260)], fleet="f", round_no=1, bits=bits)
    assert 650 < len(short.data) < 760 and 650 < len(long.data) < 760
    assert len(msgpack.packb({"cohort": Participation(short, eval_threshold(0.1)).to_wire()}, use_bin_type=True)) < 800


def test_eval_rule_asks_the_fraction_and_is_checkable_by_anyone():
    ids = [f"agent-{i}" for i in range(10_000)]
    rule = Participation(eval_threshold=eval_threshold(0.1))
    asked = [c for c in ids if rule.asks_eval(c, fleet="f", model_version=3)]
    assert 850 < len(asked) < 1150
    assert asked == [c for c in ids if Participation(eval_threshold=eval_threshold(0.1)).asks_eval(c, fleet="f", model_version=3)]
    assert asked != [c for c in ids if rule.asks_eval(c, fleet="f", model_version=4)]  # a new sample per version
    assert all(Participation(eval_threshold=EVAL_ALL).asks_eval(c, fleet="f", model_version=3) for c in ids[:100])
    assert not any(Participation(eval_threshold=0).asks_eval(c, fleet="f", model_version=3) for c in ids[:100])
    assert not Participation().asks_eval("agent-1", fleet="f", model_version=3)
    assert Participation().invites("agent-1", fleet="f", round_no=3)  # no cohort: everyone trains


@pytest.mark.parametrize("wire, message", [
    ({"n": 2, "p": 4, "set": b""}, "ends after 0"),
    ({"n": 1, "p": 4, "set": b"\xff\xff"}, "ends after 0"),
    ({"n": 1, "p": 4, "set": b"\x00\xff"}, "trailing"),
    ({"n": 1, "p": 4, "set": b"\x00\x00\x00"}, "trailing"),
    ({"n": 1, "p": 4, "set": b"\x80"}, "out of range"),  # quotient 1: 16 >= n << p
    ({"n": -1, "p": 4, "set": b""}, "n must be"),
    ({"n": 1, "p": 0, "set": b"\x00"}, "p must be"),
    ({"n": 1, "p": 41, "set": b"\x00"}, "p must be"),
    ({"n": 1, "p": 4, "set": "text"}, "must be bin"),
    ({"n": 1, "p": 4}, "must be bin"),
    ({"eval": -1}, "eval must be"),
    ({"eval": EVAL_ALL + 1}, "eval must be"),
    ({"eval": 1.5}, "eval must be"),
    ({"eval": True}, "eval must be"),
    ({"members": []}, "unknown keys"),
    ([1, 2], "must be a map"),
])
def test_a_bad_cohort_is_refused_with_a_reason(wire, message):
    with pytest.raises(DecodeError, match=message):
        Participation.from_wire(wire)


def test_global_model_carries_the_cohort_and_old_messages_decode_without_one():
    invite = InviteSet.of(["agent-1", "agent-5"], fleet="f", round_no=4, bits=12)
    base = GlobalModel("f", 3, 4, None, TaskConfig(), "fp", ())
    model = GlobalModel("f", 3, 4, None, TaskConfig(), "fp", (), cohort=Participation(invite, eval_threshold(0.5)))
    decoded = GlobalModel.from_bytes(model.to_bytes(), max_bytes=1 << 20)
    assert decoded == model and decoded.cohort is not None
    assert decoded.cohort.invites("agent-5", fleet="f", round_no=4)
    assert GlobalModel.from_bytes(base.to_bytes(), max_bytes=1 << 20).cohort is None
    assert b"cohort" not in base.to_bytes()  # a model without a cohort has exactly the bytes it had before
    # an agent that predates cohorts decodes the same payload: the field is an unknown key to it
    assert "cohort" in msgpack.unpackb(model.to_bytes(), raw=False)
    broken = msgpack.unpackb(model.to_bytes(), raw=False)
    broken["cohort"]["set"] = broken["cohort"]["set"] + b"\x01"
    with pytest.raises(DecodeError, match="trailing"):
        GlobalModel.from_bytes(msgpack.packb(broken, use_bin_type=True), max_bytes=1 << 20)


def test_invite_bits_and_threshold_bounds():
    assert invite_bits(100) == 14 and invite_bits(1) == 7
    with pytest.raises(ValueError):
        invite_bits(0)
    with pytest.raises(ValueError):
        eval_threshold(1.5)
    with pytest.raises(ValueError):
        InviteSet.of(["a"], fleet="f", round_no=1, bits=0)
    assert InviteSet.of([], fleet="f", round_no=1, bits=4).contains("a", fleet="f", round_no=1) is False
