"""Sealed shares open only for their recipient, in their round, session and phase; bad keys are refused."""

from __future__ import annotations

import random

import pytest

from fedge_contract.errors import Reason
from fedge_contract.secagg import boxes, crypto
from fedge_contract.secagg.crypto import Context, KeyPair
from fedge_contract.secagg.errors import ProtocolError

RAND = random.Random(5).randbytes
ALICE, BOB, CAROL = (KeyPair.generate(RAND) for _ in range(3))
CONTEXT = Context("fleet", 2, "s1")
# X25519 points of small order (RFC 7748 section 6.1 lists why they must be refused): the identity and a point of order 8
LOW_ORDER = [bytes(32), bytes([1]) + bytes(31), bytes.fromhex("e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800")]


def _sealed(context: Context = CONTEXT) -> bytes:
    return boxes.seal(context, ALICE.private, BOB.public, "alice", "bob", 12345, 67890, RAND)


def test_the_recipient_opens_what_was_sealed_for_it() -> None:
    assert boxes.open_box(CONTEXT, BOB.private, ALICE.public, "alice", "bob", _sealed()) == (12345, 67890)


@pytest.mark.parametrize(
    ("context", "private", "sender", "recipient"),
    [
        (Context("fleet", 3, "s1"), BOB.private, "alice", "bob"),  # another round
        (Context("fleet", 2, "s2"), BOB.private, "alice", "bob"),  # another session
        (Context("other", 2, "s1"), BOB.private, "alice", "bob"),  # another fleet
        (CONTEXT, BOB.private, "carol", "bob"),  # claimed to come from someone else
        (CONTEXT, BOB.private, "alice", "carol"),  # relayed to someone else, named as the recipient
        (CONTEXT, CAROL.private, "alice", "bob"),  # opened by a third party's key
    ],
)
def test_a_box_opens_nowhere_else(context: Context, private: bytes, sender: str, recipient: str) -> None:
    with pytest.raises(ProtocolError) as refused:
        boxes.open_box(context, private, ALICE.public, sender, recipient, _sealed())
    assert refused.value.reason is Reason.UNAUTHENTIC


def test_a_tampered_or_truncated_box_is_refused() -> None:
    box = bytearray(_sealed())
    box[20] ^= 1
    for bad in (bytes(box), _sealed()[:20]):
        with pytest.raises(ProtocolError) as refused:
            boxes.open_box(CONTEXT, BOB.private, ALICE.public, "alice", "bob", bad)
        assert refused.value.reason is Reason.UNAUTHENTIC


def test_each_seal_uses_a_fresh_nonce() -> None:
    assert _sealed()[: crypto.NONCE_BYTES] != _sealed()[: crypto.NONCE_BYTES]


@pytest.mark.parametrize("public", LOW_ORDER)
def test_low_order_public_keys_are_refused(public: bytes) -> None:
    with pytest.raises(ProtocolError) as refused:
        crypto.check_public_key(public, peer="mallory")
    assert refused.value.reason is Reason.UNAUTHENTIC
    with pytest.raises(ProtocolError):
        crypto.agree(ALICE.private, public, peer="mallory")


def test_key_derivation_is_bound_to_its_purpose_and_parties() -> None:
    secret = crypto.agree(ALICE.private, BOB.public, peer="bob")
    assert secret == crypto.agree(BOB.private, ALICE.public, peer="alice")
    infos = [CONTEXT.info("share-key", "alice", "bob"), CONTEXT.info("share-key", "bob", "alice"), CONTEXT.info("pair-mask", "alice", "bob"),
             CONTEXT.info("share-key", "alicebob"), Context("fleet", 2, "s1x").info("share-key", "alice", "bob")]
    assert len({crypto.derive(secret, info) for info in infos}) == len(infos)
    assert crypto.public_key_of(ALICE.private) == ALICE.public
