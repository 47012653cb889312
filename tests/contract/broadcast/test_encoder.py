"""The broadcast encoder: error feedback, keyframes (snapshots and resets), refusals, and its state at rest."""

from __future__ import annotations

from typing import Any

import msgpack
import numpy as np
import pytest

from fedge_contract.broadcast import BroadcastEncoder, BroadcastPolicy, Rebuilder, Step, decode_announcement, held_digest
from fedge_contract.codecs import encode_weights, fitted_to, parse_chain
from fedge_contract.errors import DecodeError, Reason
from fedge_contract.tensors import ModelSpec, TensorSpec
from tests.contract.broadcast.helpers import MAX, SPEC, about, initial, same_bits, walk


def run(policy: BroadcastPolicy, versions: int, *, seed: int = 0, devices_hold: bool = True) -> tuple[BroadcastEncoder, list[Step]]:
    rng = np.random.default_rng(seed)
    true = initial(seed)
    encoder = BroadcastEncoder(SPEC, policy)
    steps = [encoder.begin(true, 0, devices_hold=devices_hold)]
    for version in range(1, versions + 1):
        true = walk(true, rng)
        steps.append(encoder.advance(true, version))
    return encoder, steps


def gap(true: dict[str, np.ndarray], encoder: BroadcastEncoder) -> float:
    return max(float(np.abs(true[k] - encoder.held[k]).max()) for k in true)


def test_error_feedback_sends_later_what_a_broadcast_left_out() -> None:
    """A q8 reset keyframe and 10% top-k deltas lose a lot each time; the held model still converges on the true one."""
    true = initial()
    encoder = BroadcastEncoder(SPEC, BroadcastPolicy(chain="flat+topk:0.1+q8+zstd", keyframe_chain="q4", every=1000, ratio=None))
    encoder.begin(true, 0)
    gaps = [gap(true, encoder)]
    for version in range(1, 41):
        encoder.advance(true, version)  # the true model stands still: only the residual travels
        gaps.append(gap(true, encoder))
    assert gaps[0] > 1e-3  # what q4 lost from the first model
    assert gaps[-1] < gaps[0] / 100
    assert gaps[-1] < 1e-5


def test_a_lossless_delta_chain_leaves_only_float32_rounding() -> None:
    rng, true = np.random.default_rng(3), initial()
    encoder = BroadcastEncoder(SPEC, BroadcastPolicy(chain="none", ratio=None))
    encoder.begin(true, 0, devices_hold=True)
    for version in range(1, 20):
        true, before = walk(true, rng, 0.1), dict(encoder.held)
        encoder.advance(true, version)
        for name, values in true.items():  # |t - fl(h + fl(t - h))| <= 2 ulp of the largest of t, h and the result
            largest = np.maximum(np.maximum(np.abs(values), np.abs(before[name])), np.abs(encoder.held[name]))
            assert (np.abs(values - encoder.held[name]) <= 2 * np.spacing(largest)).all()


def test_snapshots_every_k_versions_retire_the_deltas_they_cover() -> None:
    encoder, steps = run(BroadcastPolicy(chain="q8+zstd", keyframe_chain="flat+zstd", every=3, ratio=None), 7)
    assert steps[0].broadcast.kind == "hold" and steps[0].keyframe is not None and steps[0].keyframe.version == 0
    kinds = [(s.broadcast.kind, s.retained, s.keyframe.version if s.keyframe else None, s.retire) for s in steps[1:]]
    assert kinds == [
        ("delta", True, None, ()), ("delta", True, None, ()), ("delta", False, 3, (1, 2)),
        ("delta", True, None, ()), ("delta", True, None, ()), ("delta", False, 6, (4, 5)), ("delta", True, None, ()),
    ]
    assert [b.version for b in encoder.retained] == [7] and encoder.keyframe.version == 6
    assert steps[3].broadcast.keyframe_version == 3 and steps[4].broadcast.keyframe_version == 3
    assert steps[3].keyframe is not None and steps[3].keyframe.held_hash == steps[3].broadcast.held_hash


def test_resets_make_the_keyframe_the_broadcast_and_the_decoded_keyframe_the_held_model() -> None:
    encoder, steps = run(BroadcastPolicy(chain="q8+zstd", keyframe_chain="q8+zstd", every=2, ratio=None), 4, devices_hold=False)
    assert [s.broadcast.kind for s in steps] == ["full", "delta", "full", "delta", "full"]
    assert steps[2].retire == (1,) and steps[4].retire == (3,)
    last = steps[-1]
    assert last.keyframe is not None and last.broadcast.tensors == last.keyframe.tensors
    assert held_digest(dict(encoder.held), SPEC) == last.keyframe.held_hash


def test_a_hold_keeps_its_keyframe_lossless_even_when_keyframes_are_resets() -> None:
    true = initial()
    encoder = BroadcastEncoder(SPEC, BroadcastPolicy(keyframe_chain="q4+zstd"))
    step = encoder.begin(true, 0, devices_hold=True)
    assert step.broadcast.kind == "hold" and step.broadcast.tensors == ()
    assert same_bits(dict(encoder.held), true) and step.broadcast.held_hash == held_digest(true, SPEC)
    assert step.keyframe is not None and str(step.keyframe.tensors[0].codec) == "flat+zstd"


def test_keyframes_when_the_retained_deltas_outweigh_a_share_of_the_keyframe_and_on_demand() -> None:
    encoder, steps = run(BroadcastPolicy(chain="none", keyframe_chain="none", every=1000, ratio=1.5), 8)
    keyframes = [s.broadcast.version for s in steps[1:] if s.keyframe is not None]
    assert keyframes == [3, 6]  # each delta is as large as the model: two retained outweigh 1.5 keyframes
    encoder.request_keyframe()
    assert encoder.advance(walk(dict(encoder.held), np.random.default_rng(1)), 9).keyframe is not None
    assert encoder.advance(walk(dict(encoder.held), np.random.default_rng(2)), 10).keyframe is None


def test_broadcasts_reproduce_from_the_seed() -> None:
    policy = BroadcastPolicy(chain="flat+topk:0.2+q4+zstd", every=4, seed=5)
    (_, first), (_, second) = run(policy, 6), run(policy, 6)
    assert first == second
    (_, other) = run(BroadcastPolicy(chain="flat+topk:0.2+q4+zstd", every=4, seed=6), 6)
    assert other[3].broadcast.tensors != first[3].broadcast.tensors


def test_refusals() -> None:
    encoder = BroadcastEncoder(SPEC, BroadcastPolicy())
    with pytest.raises(RuntimeError, match="begin"):
        encoder.advance(initial(), 1)
    encoder.begin(initial(), 4)
    with pytest.raises(RuntimeError, match="already"):
        encoder.begin(initial(), 4)
    with pytest.raises(ValueError, match="follow"):
        encoder.advance(initial(), 6)
    with pytest.raises(ValueError, match="NaN"):
        encoder.advance({**initial(), "layer.bias": np.full(12, np.nan, np.float32)}, 5)
    with pytest.raises(ValueError, match="shape"):
        encoder.advance({**initial(), "layer.bias": np.zeros(13, np.float32)}, 5)
    with pytest.raises(ValueError, match="spec does not"):
        encoder.advance({**initial(), "extra": np.zeros(1, np.float32)}, 5)
    assert encoder.version == 4  # nothing refused moved it
    with pytest.raises(ValueError):
        BroadcastPolicy(chain="q9")
    with pytest.raises(ValueError):
        BroadcastPolicy(every=0)
    with pytest.raises(ValueError):
        BroadcastPolicy(ratio=float("inf"))


def plain(state: dict[str, Any]) -> Any:
    """Through msgpack and back: the state is plain values, as a store keeps them."""
    return msgpack.unpackb(msgpack.packb(state, use_bin_type=True), raw=False)


@pytest.mark.parametrize("keyframe_chain", ["flat+zstd", "q8+zstd"])
def test_a_resumed_encoder_continues_exactly_where_it_stopped(keyframe_chain: str) -> None:
    policy = BroadcastPolicy(chain="flat+topk:0.2+q8+zstd", keyframe_chain=keyframe_chain, every=4, ratio=None)
    rng = np.random.default_rng(9)
    true = [initial()]
    for _ in range(10):
        true.append(walk(true[-1], rng))
    straight = BroadcastEncoder(SPEC, policy)
    straight_steps = [straight.begin(true[0], 0)] + [straight.advance(true[v], v) for v in range(1, 11)]
    resumed = BroadcastEncoder(SPEC, policy)
    resumed.begin(true[0], 0)
    for version in range(1, 11):
        resumed = BroadcastEncoder.from_state(plain(resumed.to_state()), SPEC, policy)
        assert resumed.advance(true[version], version) == straight_steps[version]
    assert resumed.latest == straight.latest and resumed.keyframe == straight.keyframe and resumed.retained == straight.retained
    assert same_bits(dict(resumed.held), dict(straight.held))
    resumed.request_keyframe()
    assert BroadcastEncoder.from_state(plain(resumed.to_state()), SPEC, policy).advance(true[10], 11).keyframe is not None


def broken(state: dict[str, Any], path: tuple[Any, ...], value: Any) -> dict[str, Any]:
    state = plain(state)
    target = state
    for key in path[:-1]:
        target = target[key]
    if value is ...:
        del target[path[-1]]
    else:
        target[path[-1]] = value
    return state


def test_state_that_would_serve_a_broken_chain_is_refused() -> None:
    encoder, _ = run(BroadcastPolicy(chain="q8+zstd", every=10, ratio=None), 4)
    state = encoder.to_state()
    held = bytearray(state["held"])
    held[0] ^= 1
    cases = [
        (("format",), 2, Reason.SCHEMA),
        (("fingerprint",), "0" * 16, Reason.FINGERPRINT),
        (("held",), bytes(held), Reason.HASH_MISMATCH),
        (("held",), state["held"][:-4], Reason.BAD_TENSOR),
        (("retained", 1), ..., Reason.BAD_VALUE),  # a gap in the retained deltas
        (("keyframe", "held_hash"), b"\0" * 16, Reason.HASH_MISMATCH),
        (("latest", "held_hash"), b"\0" * 16, Reason.HASH_MISMATCH),
        (("keyframe_due",), ..., Reason.MISSING_FIELD),
    ]
    for path, value, reason in cases:
        with pytest.raises(DecodeError) as caught:
            BroadcastEncoder.from_state(broken(state, path, value), SPEC, BroadcastPolicy())
        assert caught.value.reason is reason, path
    with pytest.raises(DecodeError) as caught:
        BroadcastEncoder.from_state(["not", "a", "map"], SPEC, BroadcastPolicy())
    assert caught.value.reason is Reason.WRONG_TYPE


FROZEN = ModelSpec((TensorSpec("backbone.weight", (400, 250)), TensorSpec("head.weight", (10, 20))))  # 100,000 frozen, 200 trained


def test_a_version_that_changes_few_weights_sends_no_zeros() -> None:
    """A frozen backbone under a trained head: fewer weights change per version than the chain's top 5% keep. The
    delta's fraction is lowered to the changed ones (its codec text says so; nothing else changes on the wire),
    every device rebuilds the held model bit for bit, and error feedback still brings the head home."""
    policy = BroadcastPolicy(chain="flat+topk:0.05+rice+sign", every=1000, ratio=None)
    true = initial(3, FROZEN)
    encoder = BroadcastEncoder(FROZEN, policy)
    device = Rebuilder.from_build(FROZEN, true)
    device.accept(encoder.begin(true, 0).broadcast.message(about(0, FROZEN)))
    rng = np.random.default_rng(3)
    for version in range(1, 31):
        if version <= 10:  # the head trains, then stands still: only the residual travels
            true = {**true, "head.weight": (true["head.weight"] + rng.standard_normal((10, 20)) * 0.01).astype(np.float32)}
        residual = {k: true[k] - encoder.held[k] for k in true}
        step = encoder.advance(true, version)
        [tensor] = step.broadcast.tensors
        changed = max(1, sum(int(np.count_nonzero(v)) for v in residual.values()))
        assert changed <= 200 and parse_chain(tensor.codec).sparsify.count(100_200) == changed  # type: ignore[union-attr]
        unfitted = encode_weights(residual, policy.delta_chain, np.random.default_rng(0))[0].data
        assert len(tensor.data) * 10 < len(unfitted)  # ~300 bytes instead of ~4.4 KB of positions and signs, zeros included
        held = device.accept(decode_announcement(step.broadcast.message(about(version, FROZEN)).to_bytes(), max_bytes=MAX))
        assert same_bits(dict(held.weights), encoder.held)
        if version == 10:
            trained = gap(true, encoder)
    assert same_bits({"b": encoder.held["backbone.weight"]}, {"b": true["backbone.weight"]})
    assert gap(true, encoder) < trained / 2  # sign values close the gap slowly, but they close it


def test_a_chain_fitted_to_a_sparse_vector_keeps_exactly_its_nonzeros() -> None:
    chain = parse_chain("flat+topk:0.05+rice+sign")
    weights = {"a": np.zeros((1000, 100), np.float32), "b": np.zeros(50, np.float32)}
    weights["a"][3, 4], weights["a"][500, 7], weights["b"][3] = 1.0, -2.0, 0.5
    fitted = fitted_to(chain, weights)
    assert fitted.flat and fitted.sparsify is not None and fitted.sparsify.count(100_050) == 3
    assert str(fitted).endswith("+rice+sign") and str(fitted).startswith("flat+topk:0.0000")
    assert fitted_to(chain, {"a": np.ones(100, np.float32)}) is chain  # dense: as it was
    per_tensor = parse_chain("topk:0.05+q8+zstd")
    assert fitted_to(per_tensor, weights) is per_tensor  # one fraction per message: only a flat chain is fitted
    assert fitted_to(chain, {"a": np.zeros(100, np.float32)}).sparsify.count(100) == 1  # type: ignore[union-attr]  # nothing changed: one zero
