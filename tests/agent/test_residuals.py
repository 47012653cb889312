"""Error feedback: nothing a lossy codec leaves out is lost, and the residual survives restarts."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from edge_agent.residuals import Residuals
from fedge_contract.codecs import decode_weights, parse_chain
from fedge_contract.tensors import ModelSpec, TensorSpec

SPEC = ModelSpec((TensorSpec("w", (6, 5)), TensorSpec("b", (5,))))
OTHER = ModelSpec((TensorSpec("w", (6, 6)), TensorSpec("b", (6,))))


def deltas(rng: np.random.Generator, spec: ModelSpec = SPEC) -> dict[str, np.ndarray]:
    return {t.name: rng.standard_normal(t.shape).astype(np.float32) for t in spec.tensors}


def step(store: Residuals, delta: dict[str, np.ndarray], codec: str, rng: np.random.Generator, spec: ModelSpec = SPEC) -> dict[str, np.ndarray]:
    """One agent round: encode with feedback, persist, return what the aggregator rebuilds."""
    tensors, residual = store.encode(delta, parse_chain(codec), spec, rng)
    assert residual is not None
    store.save(spec, residual)
    return decode_weights(tensors, spec)


def residual_or_zero(store: Residuals, spec: ModelSpec = SPEC) -> dict[str, np.ndarray]:
    loaded = store.load(spec)
    return loaded if loaded is not None else {t.name: np.zeros(t.shape, np.float32) for t in spec.tensors}


@settings(max_examples=40, deadline=None)
@given(
    st.sampled_from(["topk:0.1", "topk:0.05+q8", "topk:0.2+q4+zstd", "q4", "q8+lz4", "f16", "bf16", "flat+topk:0.1+q4+zstd", "flat+topk:0.05"]),
    st.integers(1, 8),
    st.integers(0, 2**32 - 1),
)
def test_sent_plus_residual_equals_the_sum_of_inputs(tmp_path_factory: pytest.TempPathFactory, codec: str, rounds: int, seed: int) -> None:
    store = Residuals(tmp_path_factory.mktemp("agent"))
    rng = np.random.default_rng(seed)
    inputs = {t.name: np.zeros(t.shape) for t in SPEC.tensors}
    sent = {t.name: np.zeros(t.shape) for t in SPEC.tensors}
    for _ in range(rounds):
        delta = deltas(rng)
        for name, values in step(store, delta, codec, rng).items():
            sent[name] += values
            inputs[name] += delta[name]
    residual = residual_or_zero(store)
    for name in inputs:
        np.testing.assert_allclose(sent[name] + residual[name], inputs[name], rtol=0, atol=1e-4 * rounds)


@settings(max_examples=30, deadline=None)
@given(
    hnp.arrays(np.float32, (6, 5), elements=st.floats(-100, 100, width=32)),
    st.sampled_from(["0.1", "0.25", "0.5"]),
    st.sampled_from(["", "flat+"]),
)
def test_every_coordinate_is_eventually_transmitted(tmp_path_factory: pytest.TempPathFactory, w: np.ndarray, fraction: str, layout: str) -> None:
    """One delta, then zeros: within ceil(1 / fraction) rounds top-k has sent every coordinate exactly."""
    store = Residuals(tmp_path_factory.mktemp("agent"))
    delta = {"w": w, "b": np.linspace(-1, 1, 5, dtype=np.float32)}
    zeros = {name: np.zeros_like(values) for name, values in delta.items()}
    codec = f"{layout}topk:{fraction}"
    total = {name: np.zeros_like(values) for name, values in delta.items()}
    rounds = int(np.ceil(1 / float(fraction)))
    for r in range(rounds):
        for name, values in step(store, delta if r == 0 else zeros, codec, np.random.default_rng(r)).items():
            total[name] += values
    for name in delta:
        np.testing.assert_array_equal(total[name], delta[name])  # no value stage: exact
    assert store.load(SPEC) is None  # nothing left: the file is gone


def test_quantised_feedback_drains_to_within_one_step(tmp_path: Path) -> None:
    """With q4 behind top-k the residual shrinks to below a quantisation step of what is left."""
    store = Residuals(tmp_path)
    rng = np.random.default_rng(3)
    delta = deltas(rng)
    zeros = {name: np.zeros_like(values) for name, values in delta.items()}
    total = {name: np.zeros(values.shape) for name, values in delta.items()}
    for r in range(40):
        for name, values in step(store, delta if r == 0 else zeros, "topk:0.25+q4", rng).items():
            total[name] += values
    for name in delta:
        assert np.abs(total[name] - delta[name]).max() < 0.05 * np.abs(delta[name]).max()


def test_residual_survives_a_restart(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    first = Residuals(tmp_path)
    step(first, deltas(rng), "topk:0.1+q8", rng)
    before = first.load(SPEC)
    assert before is not None and any(np.any(v) for v in before.values())
    reborn = Residuals(tmp_path)  # a new process on the same state dir
    after = reborn.load(SPEC)
    assert after is not None
    for name in before:
        np.testing.assert_array_equal(after[name], before[name])
    files = list(tmp_path.iterdir())
    assert [f.name for f in files] == [f"residual-{SPEC.fingerprint}.weights"]  # no temporaries left behind


def test_feedback_is_added_to_the_next_delta(tmp_path: Path) -> None:
    store = Residuals(tmp_path)
    w = np.zeros((6, 5), np.float32)
    w[0, 0], w[1, 1] = 5.0, 4.0  # topk:0.04 keeps 2 of 30 in w, 1 of 5 in b
    b = np.array([1.0, 0.5, 0, 0, 0], np.float32)
    sent = step(store, {"w": w, "b": b}, "topk:0.04", np.random.default_rng(0))
    assert sent["b"].tolist() == [1.0, 0, 0, 0, 0]
    w2 = np.zeros((6, 5), np.float32)
    w2[2, 2] = 0.1
    sent = step(store, {"w": w2, "b": np.zeros(5, np.float32)}, "topk:0.04", np.random.default_rng(1))
    assert sent["b"].tolist() == [0, 0.5, 0, 0, 0]  # last round's leftover, not today's zero


def test_fingerprint_change_resets_the_residual(tmp_path: Path) -> None:
    store = Residuals(tmp_path)
    rng = np.random.default_rng(0)
    step(store, deltas(rng), "topk:0.1", rng)
    assert store.load(SPEC) is not None
    step(store, deltas(rng, OTHER), "topk:0.1", rng, spec=OTHER)
    assert store.load(OTHER) is not None
    assert store.load(SPEC) is None and not store.path(SPEC.fingerprint).exists()


def test_lossless_chain_sends_the_residual_and_clears_it(tmp_path: Path) -> None:
    store = Residuals(tmp_path)
    rng = np.random.default_rng(0)
    first = deltas(rng)
    step(store, first, "topk:0.1", rng)
    left = store.load(SPEC)
    assert left is not None
    second = deltas(rng)
    sent = step(store, second, "zstd", rng)
    for name in second:
        np.testing.assert_allclose(sent[name], second[name] + left[name], atol=1e-6)
    assert store.load(SPEC) is None and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("content", [b"", b"garbage", b"\x91\x80"])
def test_corrupt_residual_file_is_ignored(tmp_path: Path, content: bytes) -> None:
    store = Residuals(tmp_path)
    store.path(SPEC.fingerprint).write_bytes(content)
    assert store.load(SPEC) is None
    sent = step(store, deltas(np.random.default_rng(0)), "topk:0.5", np.random.default_rng(0))
    assert set(sent) == {"w", "b"}


def test_residual_of_another_shape_under_our_name_is_ignored(tmp_path: Path) -> None:
    store = Residuals(tmp_path)
    rng = np.random.default_rng(0)
    step(store, deltas(rng, OTHER), "topk:0.1", rng, spec=OTHER)
    store.path(OTHER.fingerprint).rename(store.path(SPEC.fingerprint))
    assert store.load(SPEC) is None


def test_non_finite_delta_keeps_the_old_residual(tmp_path: Path) -> None:
    store = Residuals(tmp_path)
    rng = np.random.default_rng(0)
    step(store, deltas(rng), "topk:0.1+q8", rng)
    before = store.load(SPEC)
    bad = deltas(rng)
    bad["w"][0, 0] = np.nan
    tensors, residual = store.encode(bad, parse_chain("topk:0.1+q8"), SPEC, rng)
    assert residual is None and len(tensors) == 2
    after = store.load(SPEC)
    assert before is not None and after is not None
    np.testing.assert_array_equal(after["w"], before["w"])


def test_a_delta_that_moved_few_weights_sends_only_those(tmp_path: Path) -> None:
    """A frozen ``w`` under a trained ``b``: 5 of 35 weights moved, fewer than the chain's top half keeps. The
    Update's codec keeps exactly the 5 (no zeros at full price), and what is sent plus the residual is the delta."""
    store = Residuals(tmp_path)
    delta = {"w": np.zeros((6, 5), np.float32), "b": np.array([0.5, -1.0, 2.0, -0.25, 1.5], np.float32)}
    tensors, residual = store.encode(delta, parse_chain("flat+topk:0.5+rice+sign"), SPEC, np.random.default_rng(0))
    [tensor] = tensors
    assert parse_chain(tensor.codec).sparsify.count(35) == 5  # type: ignore[union-attr]
    assert residual is not None
    sent = decode_weights(tensors, SPEC)
    assert not sent["w"].any() and not residual["w"].any()
    np.testing.assert_allclose(sent["b"] + residual["b"], delta["b"], rtol=0, atol=1e-6)
