"""The aggregator never holds an individual delta: after a real session over Mosquitto (one device
lost after its shares, so the server rebuilds a mask key, the case where it learns the most), the test
plays the curious aggregator with everything the relay stored (the spool and every checkpoint) and
fails to recover any device's input. A positive control shows the attack itself is sound: adding the
one thing the aggregator never had (the survivor's own mask key) recovers the input exactly."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from typing import Any

import msgpack
import numpy as np
import pytest

from aggregator.secagg_relay import SecAggSettings, SecureMean
from fedge_contract.errors import DecodeError
from fedge_contract.secagg import KeyAdvert, MaskedInput, Reveal, Setup, Shares, crypto, masks, shamir
from fedge_contract.secagg.graph import Graph
from tests.integration.secagg_fleet import TIMEOUTS, ModuleDevice, Store, announcement, coordinator, deltas, running

pytestmark = pytest.mark.integration


async def test_nothing_the_relay_stored_recovers_any_device_s_delta(broker_address, fleet, tmp_path):
    clients = [f"dev-{i}" for i in range(8)]
    devices = [ModuleDevice(broker_address, fleet, c, tmp_path / c, lose_after=Shares if c == "dev-0" else None) for c in clients]
    inputs, store = deltas(clients, seed=7), Store()
    settings = SecAggSettings(timeouts=dataclasses.replace(TIMEOUTS, mask=4.0))
    model = announcement(fleet, 1, settings)
    async with asyncio.timeout(60), running(devices), coordinator(broker_address, fleet, store, settings=settings) as coord:
        for device in devices:
            await device.secure.on_announcement(model)
            await device.secure.submit(model, *inputs[device.client_id])
        setup = await coord.relay.start(1, clients, now=time.monotonic())
        await coord.run()
    outcome = coord.relay.outcome
    assert isinstance(outcome, SecureMean) and "dev-0" not in outcome.survivors
    truth = {d.client_id: d.secure.submitted[setup.session] for d in devices if d.client_id in outcome.survivors}
    everything = store.everything()

    # 1. no device's encoded input, nor its float delta, appears anywhere in what was stored
    for client, vector in truth.items():
        assert setup.ring.to_bytes(vector)[:64] not in everything, client
        for values in inputs[client][0].values():
            assert values.tobytes()[:64] not in everything, client

    # 2. each spooled vector is masked: it agrees with the device's input on no more coordinates than chance
    spooled = {m.sender: m for m in (MaskedInput.from_bytes(p, max_bytes=1 << 20) for p in store.spool[setup.session])}
    assert set(spooled) == set(truth)
    ring = setup.ring
    for client, message in spooled.items():
        assert np.mean(ring.from_bytes(message.data, message.length) == truth[client]) < 0.02

    # 3. the curious aggregator: rebuild every secret the stored reveals allow and strip those masks
    snapshot = msgpack.unpackb(store.checkpoints[-1], raw=False)["server"]
    stored_setup = Setup.from_bytes(snapshot["setup"])
    assert stored_setup == setup and not any(isinstance(v, np.ndarray) for v in snapshot.values())
    adverts = {a.sender: a for a in (KeyAdvert.from_bytes(b) for b in snapshot["adverts"])}
    graph = Graph(tuple(sorted(adverts)), setup.degree, snapshot["graph_seed"])
    seeds: dict[str, dict[int, int]] = {}
    keys: dict[str, dict[int, int]] = {}
    for reveal in (Reveal.from_bytes(b) for b in snapshot["reveals"]):
        for found, revealed in ((seeds, reveal.seeds), (keys, reveal.keys)):
            for r in revealed:
                found.setdefault(r.peer, {})[graph.index(reveal.sender)] = shamir.share_from_bytes(r.share, what="")
    rebuilt_keys = {v: shamir.reconstruct(s, setup.threshold, what=v) for v, s in keys.items()}
    assert set(rebuilt_keys) == {"dev-0"}  # the dropped device's mask key, and only that one
    context, length = setup.context, setup.length
    sharers = set(snapshot["sharers"])
    for client in truth:
        with pytest.raises(DecodeError):  # not enough shares of a survivor's mask key: none at all
            shamir.reconstruct(keys.get(client, {}), setup.threshold, what=client)
        seed = shamir.reconstruct(seeds[client], setup.threshold, what=client)
        remains = ring.sub(ring.from_bytes(spooled[client].data, length), masks.self_mask(context, seed, client, ring, length))
        partners = graph.neighbours(client) & sharers
        for v in partners & set(rebuilt_keys):
            pair = masks.pair_mask(context, crypto.agree(rebuilt_keys[v], adverts[client].mask_key, peer=client), client, v, ring, length)
            remains = ring.sub(remains, pair) if masks.adds_pair_mask(client, v) else ring.add(remains, pair)
        assert np.mean(remains == truth[client]) < 0.02, client  # still masked by the pairs among survivors
        decoded = setup.fixed_point.decode_sum(remains, 1)[1:]
        flat = np.concatenate([inputs[client][0][t].ravel() for t in ("w", "b")]) * inputs[client][1] / settings.max_weight
        # read as a delta it is noise across the whole range (uniform in +-64 here), nowhere near the real one (|x| < 0.03)
        assert np.median(np.abs(decoded - flat)) > 1.0, client
        assert abs(np.corrcoef(decoded, flat)[0, 1]) < 6 / np.sqrt(flat.size), client  # 6 sigma of a chance correlation

        # positive control: the survivor's own mask key, which never left the device, removes exactly what is left
        session = next(d for d in devices if d.client_id == client).secure.session
        assert session is not None
        secret: Any = session._mask.private
        assert secret not in everything
        for w in partners - set(rebuilt_keys):
            pair = masks.pair_mask(context, crypto.agree(secret, adverts[w].mask_key, peer=w), client, w, ring, length)
            remains = ring.sub(remains, pair) if masks.adds_pair_mask(client, w) else ring.add(remains, pair)
        assert np.array_equal(remains, truth[client])
