"""What the aggregator holds (every message it received or sent, its snapshot, its spool) does not give
it any one device's input: each survivor's masked input stays masked by pairwise masks whose keys it
never receives, in any form; a positive control shows that exactly that missing key would unmask it."""

from __future__ import annotations

from typing import Any

import msgpack
import numpy as np
import pytest

from fedge_contract.errors import DecodeError
from fedge_contract.secagg import Aggregate, KeyAdvert, MaskedInput, Reveal, crypto, masks, shamir
from fedge_contract.secagg.messages import MESSAGE_TYPES, Message
from tests.contract.secagg.relay import Dropouts, Relay, make_setup, random_inputs

LENGTH = 256


def _decode_any(payload: bytes) -> Message:
    for kind in MESSAGE_TYPES:
        try:
            return kind.from_bytes(payload, max_bytes=1 << 26)
        except DecodeError:
            continue
    raise AssertionError("the server saw a payload no decoder takes")


@pytest.fixture(scope="module")
def finished() -> tuple[Relay, list[Message], bytes]:
    setup = make_setup(30, degree=8, threshold=5, length=LENGTH)
    c = setup.cohort
    relay = Relay(setup, random_inputs(setup), Dropouts(after_shares=frozenset(c[:2]), after_masked=frozenset(c[2:4])))
    assert isinstance(relay.run(), Aggregate)
    view = [_decode_any(p) for p in relay.server_saw]
    everything = b"".join(relay.server_saw) + msgpack.packb(relay.server.snapshot(), use_bin_type=True)
    return relay, view, everything


def _of(view: list[Message], kind: type[Any]) -> list[Any]:
    return [m for m in view if isinstance(m, kind)]


def test_no_survivor_s_mask_key_and_no_dropped_device_s_seed_reaches_the_server(finished: tuple[Relay, list[Message], bytes]) -> None:
    relay, view, everything = finished
    survivors = set(relay.server.survivors)
    dropped = set(relay.server._sharers) - survivors
    reveals = _of(view, Reveal)
    assert not [r for m in reveals for r in m.keys if r.peer in survivors]
    assert not [r for m in reveals for r in m.seeds if r.peer in dropped]
    for client, device in relay.devices.items():
        assert device._mask.private not in everything and device._cipher.private not in everything
        for holder in relay.devices.values():
            held = holder._held.get(client)
            if held is None:
                continue
            if client in survivors:  # its key shares stay inside the boxes, sealed for its neighbours
                assert shamir.share_to_bytes(held.key_share) not in everything
            if client in dropped:
                assert shamir.share_to_bytes(held.seed_share) not in everything


def test_a_survivor_s_masked_input_stays_masked_with_everything_the_server_can_rebuild(finished: tuple[Relay, list[Message], bytes]) -> None:
    relay, view, _ = finished
    setup, ring, context = relay.setup, relay.setup.ring, relay.setup.context
    graph = relay.server._require_graph()
    adverts = {m.sender: m for m in _of(view, KeyAdvert)}
    masked = {m.sender: ring.from_bytes(m.data, m.length) for m in _of(view, MaskedInput)}
    seeds: dict[str, dict[int, int]] = {}
    keys: dict[str, dict[int, int]] = {}
    for reveal in _of(view, Reveal):
        x = graph.index(reveal.sender)
        for store, revealed in ((seeds, reveal.seeds), (keys, reveal.keys)):
            for r in revealed:
                store.setdefault(r.peer, {})[x] = shamir.share_from_bytes(r.share, what="")
    dropped_keys = {v: shamir.reconstruct(s, setup.threshold, what=v) for v, s in keys.items()}
    sharers = set(relay.server._sharers)
    for u in relay.server.survivors:
        with pytest.raises(DecodeError):  # not one share of a survivor's mask key, let alone threshold
            shamir.reconstruct(keys.get(u, {}), setup.threshold, what=u)
        seed = shamir.reconstruct(seeds[u], setup.threshold, what=u)
        remains = ring.sub(masked[u], masks.self_mask(context, seed, u, ring, LENGTH))
        partners = graph.neighbours(u) & sharers
        for v in partners & set(dropped_keys):  # masks towards dropped devices: the server can remove them
            pair = masks.pair_mask(context, crypto.agree(dropped_keys[v], adverts[u].mask_key, peer=u), u, v, ring, LENGTH)
            remains = ring.sub(remains, pair) if masks.adds_pair_mask(u, v) else ring.add(remains, pair)
        truth = relay.inputs[u]
        assert np.mean(remains == truth) < 0.02  # still masked by the pairs among survivors
        # positive control: u's mask key (which the server never had) removes exactly what is left
        secret = relay.devices[u]._mask.private
        for w in partners - set(dropped_keys):
            pair = masks.pair_mask(context, crypto.agree(secret, adverts[w].mask_key, peer=w), u, w, ring, LENGTH)
            remains = ring.sub(remains, pair) if masks.adds_pair_mask(u, w) else ring.add(remains, pair)
        assert np.array_equal(remains, truth)


def test_the_spool_and_the_snapshot_hold_no_input(finished: tuple[Relay, list[Message], bytes]) -> None:
    relay, _, everything = finished
    for message in relay.spool:
        stored = relay.setup.ring.from_bytes(message.data, message.length)
        assert np.mean(stored == relay.inputs[message.sender]) < 0.02
    for client, vector in relay.inputs.items():
        assert relay.setup.ring.to_bytes(vector)[:64] not in everything, client
    snapshot = relay.server.snapshot()
    assert not any(isinstance(v, np.ndarray) for v in snapshot.values())
