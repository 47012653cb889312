"""Server optimisers against hand-computed values over three rounds (Reddi et al. 2021, Alg. 2).

Every case uses one tensor ``w`` = [0, 0] and round deltas [d, -d] (so sign handling is checked
on the second coordinate), d = 2, 1, 3 over the three rounds; server_lr 1, beta1 0.5, beta2 0.5,
tau 1, so v starts at tau**2 = 1 and m at 0. Expected values are worked out in the comments.
"""

from __future__ import annotations

import numpy as np
import pytest

from aggregator.aggregation.strategies import STRATEGIES, FedAdagrad, FedAdam, FedAvg, FedAvgM, FedYogi, StrategyConfig, make_strategy
from fedge_contract.messages import pack_weights, unpack_weights

DELTAS = (2.0, 1.0, 3.0)
# m_t = 0.5 m_{t-1} + 0.5 d_t: m = 1, 1, 2 for every adaptive optimiser
M = (1.0, 1.0, 2.0)


def f32(*values: float) -> np.ndarray:
    return np.array(values, np.float32)


def run_three_rounds(strategy) -> list[tuple[np.ndarray, dict[str, np.ndarray]]]:
    weights = {"w": f32(0, 0)}
    seen = []
    for d in DELTAS:
        weights = strategy.apply(weights, {"w": f32(d, -d)})
        seen.append((weights["w"], strategy.state()))
    return seen


def test_fedavgm_by_hand() -> None:
    # server_lr 0.5, momentum 0.5, w0 = [1, -1], deltas [2, -4], [0, 2], [-2, 1]
    # v1 = [2, -4]                     w1 = [1, -1] + 0.5 [2, -4]  = [2, -3]
    # v2 = 0.5 [2, -4] + [0, 2] = [1, 0]      w2 = [2.5, -3]
    # v3 = 0.5 [1, 0] + [-2, 1] = [-1.5, 1]   w3 = [1.75, -2.5]
    strategy = FedAvgM(server_lr=0.5, momentum=0.5)
    weights = {"w": f32(1, -1)}
    expected_w = [f32(2, -3), f32(2.5, -3), f32(1.75, -2.5)]
    expected_v = [f32(2, -4), f32(1, 0), f32(-1.5, 1)]
    for delta, w, v in zip((f32(2, -4), f32(0, 2), f32(-2, 1)), expected_w, expected_v, strict=True):
        weights = strategy.apply(weights, {"w": delta})
        np.testing.assert_array_equal(weights["w"], w)
        np.testing.assert_array_equal(strategy.state()["fedavgm.v.w"], v)
        assert weights["w"].dtype == np.float32


@pytest.mark.parametrize(
    ("cls", "expected_v", "expected_w"),
    [
        # Adam: v = 0.5 v + 0.5 d^2: 0.5+2 = 2.5, 1.25+0.5 = 1.75, 0.875+4.5 = 5.375
        # w += m / (sqrt(v) + 1): 1/2.5811388 = 0.3874259, +1/2.3228757 = 0.8179268, +2/3.3184046 = 1.4206260
        (FedAdam, (2.5, 1.75, 5.375), (0.387425887, 0.817926761, 1.420626017)),
        # Yogi: v = v - 0.5 d^2 sign(v - d^2): 1 - 2*sign(1-4) = 3, 3 - 0.5*sign(3-1) = 2.5, 2.5 - 4.5*sign(2.5-9) = 7
        # w += m / (sqrt(v) + 1): 1/2.7320508 = 0.3660254, +1/2.5811388 = 0.7534513, +2/3.6457513 = 1.3020351
        (FedYogi, (3.0, 2.5, 7.0), (0.366025404, 0.753451291, 1.302035061)),
        # Adagrad: v = v + d^2: 5, 6, 15
        # w += m / (sqrt(v) + 1): 1/3.2360680 = 0.3090170, +1/3.4494897 = 0.5989149, +2/4.8729833 = 1.0093411
        (FedAdagrad, (5.0, 6.0, 15.0), (0.309016994, 0.598914943, 1.009341135)),
    ],
)
def test_adaptive_optimisers_by_hand(cls, expected_v, expected_w) -> None:
    strategy = cls(server_lr=1.0, beta1=0.5, beta2=0.5, tau=1.0)
    for (w, state), m, v, expected in zip(run_three_rounds(strategy), M, expected_v, expected_w, strict=True):
        np.testing.assert_allclose(w, f32(expected, -expected), rtol=1e-6)
        np.testing.assert_allclose(state[f"{cls.name}.m.w"], f32(m, -m), rtol=1e-7)
        np.testing.assert_allclose(state[f"{cls.name}.v.w"], f32(v, v), rtol=1e-7)


def test_no_bias_correction_and_v_starts_at_tau_squared() -> None:
    """Defaults (server_lr 0.01, beta1 0.9, beta2 0.99, tau 1e-3), one round with delta 0.1.

    m1 = 0.1 * 0.1 = 0.01; v1 = 0.99 * 1e-6 + 0.01 * 0.01 = 1.0099e-4, sqrt = 0.0100493781;
    step = 0.01 * 0.01 / (0.0100493781 + 0.001) = 0.0090502831. Bias-corrected Adam would step
    ~server_lr = 0.01; starting v at 0 would give 0.01*0.01/(0.01 + 0.001) = 0.0090909.
    """
    strategy = make_strategy("fedadam")
    new = strategy.apply({"w": f32(0)}, {"w": f32(0.1)})
    np.testing.assert_allclose(new["w"], f32(0.0090502831), rtol=1e-6)


def test_state_survives_the_checkpoint_format() -> None:
    """Two rounds, state through pack/unpack (the store's format) into a fresh instance, a third round."""
    for name in ("fedavgm", "fedadam", "fedyogi", "fedadagrad"):
        config = StrategyConfig(server_lr=0.1, momentum=0.5, beta1=0.5, beta2=0.5, tau=0.1)
        steady, restarted = make_strategy(name, config), make_strategy(name, config)
        weights = {"w": f32(1, -1), "b": f32(0.5)}
        deltas = [{"w": f32(0.2 * i, -0.1), "b": f32(0.3 / i)} for i in (1, 2, 3)]
        w_steady = weights
        for delta in deltas:
            w_steady = steady.apply(w_steady, delta)
        w_restarted = restarted.apply(restarted.apply(weights, deltas[0]), deltas[1])
        saved = unpack_weights(pack_weights(restarted.state()))
        fresh = make_strategy(name, config)
        fresh.load_state(saved)
        w_restarted = fresh.apply(w_restarted, deltas[2])
        for key in weights:
            np.testing.assert_array_equal(w_restarted[key], w_steady[key], err_msg=name)
        # and a strategy that forgot its state would not have matched
        forgetful = make_strategy(name, config).apply(restarted.apply(restarted.apply(weights, deltas[0]), deltas[1]), deltas[2])
        assert not np.array_equal(forgetful["w"], w_steady["w"]), name


def test_another_strategys_state_is_ignored() -> None:
    adam = make_strategy("fedadam")
    adam.apply({"w": f32(1)}, {"w": f32(1)})
    yogi = make_strategy("fedyogi")
    yogi.load_state(adam.state())
    assert yogi.state() == {}


def test_registry_and_config() -> None:
    assert set(STRATEGIES) == {"fedavg", "fedavgm", "fedadam", "fedyogi", "fedadagrad"}
    assert isinstance(make_strategy("fedavgm"), FedAvgM)
    assert make_strategy("fedavg", StrategyConfig(server_lr=0.5)).server_lr == 0.5  # type: ignore[attr-defined]
    assert make_strategy("fedadam").server_lr == 0.01  # type: ignore[attr-defined]
    assert isinstance(make_strategy("fedavg"), FedAvg)
    with pytest.raises(ValueError, match="--mu"):
        make_strategy("fedprox")
    for bad in (dict(server_lr=0.0), dict(momentum=1.0), dict(beta1=-0.1), dict(beta2=1.5), dict(tau=0.0)):
        with pytest.raises(ValueError):
            StrategyConfig(**bad)
