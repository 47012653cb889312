"""The encoder and every device agree on the held model, bit for bit, whatever happens in between.

Hypothesis draws runs of versions (random-walk true models, random step sizes), delta and keyframe
chains (snapshots and resets), keyframes on demand, devices that miss versions, devices that
restart with or without their state, a device whose own build of the initial model differs, and
aggregator restarts through ``to_state``/``from_state`` (through msgpack, as a store would keep
it), sometimes with another delta chain. After every announcement a device receives, it holds
exactly the encoder's model: the same bytes and the same hash, reached by accepting the delta or
by catching up from the retained keyframe and deltas; it never gives up.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import msgpack
import numpy as np
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from fedge_contract.broadcast import BroadcastEncoder, BroadcastPolicy, Rebuilder
from tests.contract.broadcast.helpers import SPEC, Retained, follow, initial, same_bits, walk

DELTA_CHAINS = ["flat+topk:0.1+q8+zstd", "q8+zstd", "q4+lz4", "f16+zstd", "flat+topk:0.3+q4+zstd", "topk:0.2+bf16", "zstd", "none",
                "flat+topk:0.05+rice+sign", "topk:0.2+rice+q4", "sign:16+zstd"]
KEYFRAME_CHAINS = ["flat+zstd", "none", "lz4", "q8+zstd", "f16", "flat+q4+zstd"]  # the last three: resets

policies = st.builds(
    BroadcastPolicy,
    chain=st.sampled_from(DELTA_CHAINS),
    keyframe_chain=st.sampled_from(KEYFRAME_CHAINS),
    every=st.integers(1, 8),
    ratio=st.sampled_from([None, None, 2.0, 0.3]),  # mostly long chains, so that retained deltas get used
    seed=st.integers(0, 3),
)
DEVICES = 3


@dataclass(frozen=True)
class Advance:
    scale: float  # the true model's step this version
    missed: tuple[bool, ...]  # which devices do not receive the announcement


@dataclass(frozen=True)
class RequestKeyframe:
    pass


@dataclass(frozen=True)
class RestartAggregator:
    chain: str  # the delta chain it restarts with


@dataclass(frozen=True)
class RestartDevice:
    index: int
    keeps_state: bool  # restores its held model, or starts again from its own build


Event = Advance | RequestKeyframe | RestartAggregator | RestartDevice
events = st.lists(
    st.one_of(
        st.builds(Advance, st.sampled_from([1e-4, 1e-2, 1.0]), st.tuples(*[st.booleans()] * DEVICES)),
        st.builds(RequestKeyframe),
        st.builds(RestartAggregator, st.sampled_from(DELTA_CHAINS)),
        st.builds(RestartDevice, st.integers(0, DEVICES - 1), st.booleans()),
    ),
    min_size=1,
    max_size=25,
)


def followed(device: Rebuilder, payload: bytes, broker: Retained) -> None:
    how, _ = follow(device, payload, broker)
    event(how)
    assert how != "gave-up"


def check(device: Rebuilder, encoder: BroadcastEncoder) -> None:
    assert device.held is not None
    assert device.held.version == encoder.version
    assert device.held.digest == encoder.held_hash
    assert same_bits(dict(device.held.weights), dict(encoder.held))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(policy=policies, run=events, devices_hold=st.booleans(), seed=st.integers(0, 2**16))
def test_encoder_and_devices_agree_bit_for_bit(policy: BroadcastPolicy, run: list[Event], devices_hold: bool, seed: int) -> None:
    rng = np.random.default_rng(seed)
    true = initial(seed)
    encoder = BroadcastEncoder(SPEC, policy)
    broker = Retained()
    payload = broker.publish(encoder.begin(true, 0, devices_hold=devices_hold))
    build = dict(true)
    odd_build = {name: values + np.float32(1e-3) for name, values in true.items()}  # a device whose build differs
    devices = [Rebuilder.from_build(SPEC, build) for _ in range(DEVICES - 1)] + [Rebuilder.from_build(SPEC, odd_build)]
    for device in devices:
        followed(device, payload, broker)
        check(device, encoder)
    for step in run:
        if isinstance(step, Advance):
            true = walk(true, rng, step.scale)
            payload = broker.publish(encoder.advance(true, encoder.version + 1))
            for device, miss in zip(devices, step.missed, strict=True):
                if not miss:
                    followed(device, payload, broker)
                    check(device, encoder)
        elif isinstance(step, RequestKeyframe):
            encoder.request_keyframe()
        elif isinstance(step, RestartAggregator):
            state = msgpack.unpackb(msgpack.packb(encoder.to_state(), use_bin_type=True), raw=False)
            encoder = BroadcastEncoder.from_state(state, SPEC, replace(policy, chain=step.chain))
        else:
            kept = msgpack.unpackb(msgpack.packb(devices[step.index].to_state(), use_bin_type=True), raw=False)
            devices[step.index] = Rebuilder.from_state(kept, SPEC) if step.keeps_state else Rebuilder.from_build(SPEC, build)
    for device in devices:  # every device reconnects and gets the retained announcement: all catch up
        followed(device, broker.topics["fl/f1/global"], broker)
        check(device, encoder)
