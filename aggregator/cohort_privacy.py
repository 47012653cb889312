"""Privacy accounting for rounds whose participants come from cohort selection (aggregator/cohort.py).

Two figures, because the cohort is announced in the clear (fedge_contract/cohort.py):

- ``epsilon_over_rounds``: against an observer who sees the published models but not the
  announcements' cohorts. Each round is one sampled Gaussian mechanism with *that round's*
  sampling rate ``q_t`` (``Selection.sampling_rate``, an upper bound on any device's probability
  of being invited, which is what amplification by sampling needs); RDP adds up over rounds.
  Opacus' accountant assumes Poisson sampling; a cohort of fixed size is drawn without
  replacement, for which the same q is the usual approximation (as DP-FedAvg's accounting is).
- ``epsilon_announced``: against an observer of the announcements, who knows who was invited.
  Sampling then hides nothing: a device's loss is the Gaussian mechanism (q = 1) composed over
  the rounds it was invited to, at most ``CohortSelector.max_invitations()``.

Both need Opacus (``pip install 'fedge[dp]'``), imported only when called.
"""

from __future__ import annotations

from collections.abc import Iterable

__all__ = ["epsilon_announced", "epsilon_over_rounds"]


def epsilon_over_rounds(rates: Iterable[float], noise_multiplier: float, delta: float) -> float:
    """(epsilon, delta)-DP epsilon after one noisy round per entry of ``rates`` (each that round's q)."""
    from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent
    from opacus.accountants.rdp import RDPAccountant

    orders = RDPAccountant.DEFAULT_ALPHAS
    total = None
    for q in rates:
        if not 0 < q <= 1:
            raise ValueError(f"a sampling rate must be in (0, 1], got {q}")
        step = compute_rdp(q=q, noise_multiplier=noise_multiplier, steps=1, orders=orders)
        total = step if total is None else total + step
    if total is None:
        return 0.0
    eps, _ = get_privacy_spent(orders=orders, rdp=total, delta=delta)
    return float(eps)


def epsilon_announced(invitations: int, noise_multiplier: float, delta: float) -> float:
    """Epsilon of a device invited to ``invitations`` rounds, against an observer of the cohorts (q = 1 each)."""
    return epsilon_over_rounds([1.0] * invitations, noise_multiplier, delta)
