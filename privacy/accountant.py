"""ε for a history of Poisson-subsampled Gaussian mechanism steps (DP-SGD).

A history is a list of (noise_multiplier, sample_rate, steps) tuples, in the
order they happened. Two accountants from different code bases are offered so
that one can check the other: Opacus' RDP (the default, a conservative upper
bound) and PRV, and Google's dp-accounting RDP.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

Mechanism = tuple[float, float, int]  # (noise_multiplier, sample_rate, steps)
ACCOUNTANTS = ("rdp", "prv", "dp-accounting-rdp")


def epsilon(history: Sequence[Mechanism], delta: float, accountant: str = "rdp") -> float:
    """The (ε, δ)-DP ε after every step in `history`; inf if any step had no noise."""
    steps = [(float(s), float(q), int(n)) for s, q, n in history if int(n) > 0 and float(q) > 0]
    if not steps:
        return 0.0
    if any(s <= 0 for s, _, _ in steps):
        return math.inf
    if accountant == "dp-accounting-rdp":
        return _dp_accounting_rdp(steps, delta)
    if accountant not in ("rdp", "prv"):
        raise ValueError(f"unknown accountant {accountant!r} (known: {', '.join(ACCOUNTANTS)})")
    from opacus.accountants import PRVAccountant, RDPAccountant

    acc = RDPAccountant() if accountant == "rdp" else PRVAccountant()
    acc.history = list(steps)
    return float(acc.get_epsilon(delta))


def _dp_accounting_rdp(steps: Sequence[Mechanism], delta: float) -> float:
    import logging

    import dp_accounting

    # Orders near 1 may not converge at small σ; dp-accounting then drops those orders
    # (the bound stays valid, a little looser) and logs a warning for each one.
    absl = logging.getLogger("absl")
    level = absl.level
    absl.setLevel(logging.ERROR)
    try:
        acc = dp_accounting.rdp.RdpAccountant()
        for sigma, q, n in steps:
            event = dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma))
            acc.compose(event, n)
        return float(acc.get_epsilon(delta))
    finally:
        absl.setLevel(level)


def noise_for_target(
    target_epsilon: float, delta: float, sample_rate: float, steps: int,
    prior: Sequence[Mechanism] = (),
) -> float:
    """Smallest noise multiplier (to 0.5%) whose `steps` more steps keep ε <= target.

    `prior` is the history already spent; the search is over the new steps only.
    """
    if target_epsilon <= 0:
        raise ValueError(f"target epsilon must be > 0, got {target_epsilon}")
    prior = list(prior)

    def eps_at(sigma: float) -> float:
        return epsilon(prior + [(sigma, sample_rate, steps)], delta)

    lo, hi = 0.0, 1.0
    while eps_at(hi) > target_epsilon:
        lo, hi = hi, hi * 2
        if hi > 1e4:
            raise ValueError(
                f"target epsilon {target_epsilon} is out of reach with sample rate "
                f"{sample_rate:.4g} and {steps} steps (already spent: {epsilon(prior, delta):.3g})"
            )
    while hi - lo > 0.005 * hi:
        mid = (lo + hi) / 2
        if eps_at(mid) > target_epsilon:
            lo = mid
        else:
            hi = mid
    return hi
