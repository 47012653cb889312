"""The ring, the PRG and the masks built from them: pairwise masks cancel exactly in the sum."""

from __future__ import annotations

import itertools
import random

import numpy as np
import pytest

from fedge_contract.secagg import crypto, masks, prg
from fedge_contract.secagg.crypto import Context, KeyPair
from fedge_contract.secagg.errors import ParameterError
from fedge_contract.secagg.ring import Ring

CONTEXT = Context("fleet", 4, "session-1")


@pytest.mark.parametrize(("bits", "dtype"), [(8, np.uint8), (12, np.uint16), (16, np.uint16), (24, np.uint32), (32, np.uint32), (64, np.uint64)])
def test_ring_wraps_modulo_2_to_the_bits(bits: int, dtype: type) -> None:
    ring = Ring(bits)
    assert ring.dtype == np.dtype(dtype)
    top = ring.from_signed(np.array([-1], dtype=np.int64))
    assert int(top[0]) == (1 << bits) - 1
    assert ring.add(top, ring.from_signed(np.array([1]))).tolist() == [0]
    values = np.array([-(1 << (bits - 1)), -5, 0, 5, (1 << (bits - 1)) - 1], dtype=np.int64)
    assert ring.to_signed(ring.from_signed(values)).tolist() == values.tolist()
    assert ring.contains(ring.from_signed(values))


def test_ring_refuses_bits_it_cannot_hold_and_bytes_of_the_wrong_size() -> None:
    for bits in (7, 65):
        with pytest.raises(ParameterError):
            Ring(bits)
    ring = Ring(12)
    with pytest.raises(ParameterError):
        ring.from_bytes(bytes(5), 3)
    with pytest.raises(ParameterError):  # 0xffff is not below 2^12
        ring.from_bytes(b"\xff\xff", 1)


def test_prg_is_deterministic_per_key_and_differs_between_keys() -> None:
    ring = Ring(32)
    a, b = bytes(32), bytes(31) + b"\x01"
    assert np.array_equal(prg.expand(a, ring, 1000), prg.expand(a, ring, 1000))
    assert np.array_equal(prg.expand(a, ring, 10), prg.expand(a, ring, 1000)[:10])  # a stream: prefixes agree
    assert np.mean(prg.expand(a, ring, 1000) == prg.expand(b, ring, 1000)) < 0.01
    with pytest.raises(ParameterError):
        prg.expand(b"short", ring, 4)


@pytest.mark.parametrize("bits", [16, 32, 64, 20])
def test_prg_masks_are_uniform_over_the_ring(bits: int) -> None:
    """Each bit of the mask is a fair coin (|mean - 1/2| within 6 sigma over 40,000 draws), and none beyond ``bits`` is set."""
    ring = Ring(bits)
    mask = prg.expand(b"\x05" * 32, ring, 40_000)
    assert ring.contains(mask)
    ones = np.array([np.mean((mask.astype(np.uint64) >> np.uint64(i)) & np.uint64(1)) for i in range(bits)])
    assert np.all(np.abs(ones - 0.5) < 6 * 0.5 / np.sqrt(mask.size))


def _mask_keys(count: int) -> dict[str, KeyPair]:
    rand = random.Random(9).randbytes
    return {f"d{i:02d}": KeyPair.generate(rand) for i in range(count)}


@pytest.mark.parametrize("bits", [16, 32, 64])
def test_pairwise_masks_cancel_exactly_in_the_sum(bits: int) -> None:
    """Every device adds +PRG(s_uv) or -PRG(s_uv) for every other device; the sum of all the masks is 0."""
    ring, length = Ring(bits), 257
    keys = _mask_keys(6)
    total = ring.zeros(length)
    for owner, peer in itertools.permutations(keys, 2):
        shared = crypto.agree(keys[owner].private, keys[peer].public, peer=peer)
        mask = masks.pair_mask(CONTEXT, shared, owner, peer, ring, length)
        total = ring.add(total, mask) if masks.adds_pair_mask(owner, peer) else ring.sub(total, mask)
    assert not total.any()


def test_both_sides_of_a_pair_derive_the_same_mask_and_other_sessions_do_not() -> None:
    ring, keys = Ring(32), _mask_keys(2)
    (a, ka), (b, kb) = keys.items()
    from_a = masks.pair_mask(CONTEXT, crypto.agree(ka.private, kb.public, peer=b), a, b, ring, 64)
    from_b = masks.pair_mask(CONTEXT, crypto.agree(kb.private, ka.public, peer=a), b, a, ring, 64)
    assert np.array_equal(from_a, from_b)
    other = Context("fleet", 4, "session-2")
    assert not np.array_equal(from_a, masks.pair_mask(other, crypto.agree(ka.private, kb.public, peer=b), a, b, ring, 64))
    assert masks.adds_pair_mask(a, b) != masks.adds_pair_mask(b, a)


def test_masked_inputs_sum_to_the_inputs_once_self_masks_are_removed() -> None:
    ring, length, keys = Ring(32), 100, _mask_keys(5)
    rng = np.random.default_rng(3)
    inputs = {d: rng.integers(0, 1 << 32, length, dtype=np.uint32) for d in keys}
    seeds = {d: bytes([i]) * 32 for i, d in enumerate(keys)}
    masked_sum = ring.zeros(length)
    for owner in keys:
        y = ring.add(inputs[owner], masks.self_mask(CONTEXT, seeds[owner], owner, ring, length))
        for peer in keys:
            if peer != owner:
                pair = masks.pair_mask(CONTEXT, crypto.agree(keys[owner].private, keys[peer].public, peer=peer), owner, peer, ring, length)
                y = ring.add(y, pair) if masks.adds_pair_mask(owner, peer) else ring.sub(y, pair)
        assert np.mean(y == inputs[owner]) < 0.01  # one masked input alone looks nothing like its input
        masked_sum = ring.add(masked_sum, y)
    for owner in keys:
        masked_sum = ring.sub(masked_sum, masks.self_mask(CONTEXT, seeds[owner], owner, ring, length))
    expected = ring.zeros(length)
    for value in inputs.values():
        expected = ring.add(expected, value)
    assert np.array_equal(masked_sum, expected)
