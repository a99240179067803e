"""ε for a history of Poisson-subsampled Gaussian mechanism steps (DP-SGD).

A history is a list of (noise_multiplier, sample_rate, steps) tuples, in the order
they happened; σ is relative to the clipping norm.

The neighbouring relation says which datasets the guarantee makes indistinguishable:
- `replace-one` (what fedslm charges under, docs/privacy.md): one record replaced by
  any other; the dataset size n is public. A client's q = batch/n, its reply's
  num-examples and the FedAvg weight all depend on n and are covered.
- `add-remove`: one record added or removed, n itself private. Opacus' accountants
  assume it; used for central (user-level) DP and for comparison.

Accountants from independent code bases, so that one checks another:
- replace-one: `pld` (Google dp-accounting's privacy loss distribution, pessimistic
  rounding; the one charged) and `fft` (Koskela, Jälkö and Honkela's Fourier
  accountant). Both are tight and agree to ~1e-4 on the demo's histories.
- add-remove: `rdp` (Opacus), `prv` (Opacus), `dp-accounting-rdp`, `pld`, `fft`.

Both tight accountants assume the worst-case pair of one step, in units of the clipping
norm: N(0, σ²) without the record's draw, N(±1, σ²) with it. add-remove: (1-q)N(0) +
qN(1) against N(0); replace-one: (1-q)N(0) + qN(-1) against (1-q)N(0) + qN(1).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import numpy as np

Mechanism = tuple[float, float, int]  # (noise_multiplier, sample_rate, steps)
REPLACE_ONE, ADD_REMOVE = "replace-one", "add-remove"
ACCOUNTANTS = {
    REPLACE_ONE: ("pld", "fft"),
    ADD_REMOVE: ("rdp", "prv", "dp-accounting-rdp", "pld", "fft"),
}
CHARGED = ("pld", REPLACE_ONE)  # (accountant, relation) of every client ledger entry
PLD_INTERVAL = 1e-3  # the PLD's value discretisation: pessimistic, so still an upper bound


def epsilon(history: Sequence[Mechanism], delta: float, accountant: str = CHARGED[0],
            relation: str = CHARGED[1]) -> float:
    """The (ε, δ)-DP ε after every step in `history`; inf if any step had no noise."""
    if accountant not in ACCOUNTANTS.get(relation, ()):
        raise ValueError(f"no accountant {accountant!r} for relation {relation!r} (known: "
                         + "; ".join(f"{r}: {', '.join(a)}" for r, a in ACCOUNTANTS.items())
                         + ")")
    steps = [(float(s), float(q), int(n)) for s, q, n in history if int(n) > 0 and float(q) > 0]
    if not steps:
        return 0.0
    if any(s <= 0 for s, _, _ in steps):
        return math.inf
    if accountant == "pld":
        return _pld(steps, delta, relation)
    if accountant == "fft":
        return _fft(steps, delta, relation)
    if accountant == "dp-accounting-rdp":
        return _dp_accounting_rdp(steps, delta)
    from opacus.accountants import PRVAccountant, RDPAccountant

    acc = RDPAccountant() if accountant == "rdp" else PRVAccountant()
    acc.history = list(steps)
    return float(acc.get_epsilon(delta))


def _events(steps: Sequence[Mechanism]):
    import dp_accounting

    return [(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(s)), n)
            for s, q, n in steps]


def _pld(steps: Sequence[Mechanism], delta: float, relation: str) -> float:
    import dp_accounting
    from dp_accounting.pld import pld_privacy_accountant

    neighbours = dp_accounting.NeighboringRelation
    # A coarser grid where σ is small (ε in the hundreds): the same ε to a fraction of a
    # percent, seconds instead of minutes, and still an upper bound (pessimistic rounding).
    interval = PLD_INTERVAL * max(1.0, (0.3 / min(s for s, _, _ in steps)) ** 2)
    acc = pld_privacy_accountant.PLDAccountant(
        neighboring_relation=neighbours.REPLACE_ONE if relation == REPLACE_ONE
        else neighbours.ADD_OR_REMOVE_ONE, value_discretization_interval=interval)
    for event, n in _events(_grouped(steps)):
        acc.compose(event, n)
    return float(acc.get_epsilon(delta))


def _dp_accounting_rdp(steps: Sequence[Mechanism], delta: float) -> float:
    import dp_accounting

    with _quiet_absl():
        acc = dp_accounting.rdp.RdpAccountant()
        for event, n in _events(steps):
            acc.compose(event, n)
        return float(acc.get_epsilon(delta))


@contextmanager
def _quiet_absl() -> Iterator[None]:
    """Orders near 1 may not converge at small σ; dp-accounting's RDP then drops those
    orders (the bound stays valid, a little looser) and logs a warning for each one."""
    absl = logging.getLogger("absl")
    level = absl.level
    absl.setLevel(logging.ERROR)
    try:
        yield
    finally:
        absl.setLevel(level)


def _grouped(steps: Sequence[Mechanism]) -> list[Mechanism]:
    """Equal mechanisms merged (composition is commutative): a PLD per distinct one."""
    counts: dict[tuple[float, float], int] = {}
    for s, q, n in steps:
        counts[(s, q)] = counts.get((s, q), 0) + n
    return [(s, q, n) for (s, q), n in counts.items()]


def _fft(steps: Sequence[Mechanism], delta: float, relation: str) -> float:
    """Koskela, Jälkö and Honkela's Fourier accountant (the `fourier-accountant` package):
    the privacy loss distribution on a grid over [-L, L], composed by FFT."""
    import fourier_accountant

    grouped = _grouped(steps)
    sigma, q, n = (np.array([m[i] for m in grouped]) for i in range(3))
    if relation == ADD_REMOVE and np.any(q >= 1):
        raise ValueError("the fft accountant's add-remove path needs sample rates below 1")
    get = fourier_accountant.get_epsilon_S if relation == REPLACE_ONE \
        else fourier_accountant.get_epsilon_R
    # The grid cuts the loss distribution at ±L: an ε near L comes out too small (19.90
    # read 18.51 at L = 20, 19.90 at L = 30 and beyond), so a result counts only below L/2.
    for bound in (20.0, 40.0, 80.0, 160.0):
        try:
            found = float(get(target_delta=delta, sigma=sigma, q=q, ncomp=n.astype(int),
                              nx=int(1e6), L=bound))
        except ValueError:
            continue
        if found <= bound / 2:
            return found
    raise ValueError("ε is beyond the Fourier accountant's range (L = 160)")


def flower_rdp(history: Sequence[Mechanism], delta: float, population: int) -> float:
    """ε by Flower 1.42's own RdpAccountant (user-level: Poisson sampling of clients,
    add/remove one client). It wraps dp-accounting's RDP, so it is independent of Opacus,
    not of `dp-accounting-rdp`. Its events take a whole expected sample of a population:
    ValueError when q·population is not an integer (the model does not match)."""
    if any(sigma <= 0 for sigma, q, n in history if n > 0 and q > 0):
        return math.inf  # no noise (or noise whoever has the seed can remove)
    from flwr.serverapp import (
        GaussianPrivacyEvent,
        NeighboringRelation,
        PrivacyConfig,
        RdpAccountant,
        SamplingMethod,
    )

    acc = RdpAccountant(PrivacyConfig(
        target_delta=delta, population_size=population,
        neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
        sampling_method=SamplingMethod.POISSON))
    with _quiet_absl():
        for sigma, q, n in _grouped([m for m in history if m[2] > 0 and m[1] > 0]):
            if sigma <= 0:
                return math.inf
            size = q * population
            if abs(size - round(size)) > 1e-9 or round(size) < 1:
                raise ValueError(f"sample rate {q:g} is not a whole number of the "
                                 f"{population} clients")
            acc.compose(GaussianPrivacyEvent(sigma, round(size), population), n)
        return float(acc.get_epsilon(delta)) if acc.num_releases else 0.0


def noise_for_target(
    target_epsilon: float, delta: float, sample_rate: float, steps: int,
    prior: Sequence[Mechanism] = (), relation: str = CHARGED[1],
) -> float:
    """Smallest noise multiplier (to 0.5%) whose `steps` more steps keep ε <= target under
    `relation` (by the charged accountant).

    `prior` is the history already spent; the search is over the new steps only.
    """
    if target_epsilon <= 0:
        raise ValueError(f"target epsilon must be > 0, got {target_epsilon}")
    prior = list(prior)

    def eps_at(sigma: float) -> float:
        return epsilon(prior + [(sigma, sample_rate, steps)], delta, relation=relation)

    lo, hi = 0.0, 1.0
    while eps_at(hi) > target_epsilon:
        lo, hi = hi, hi * 2
        if hi > 1e4:
            raise ValueError(
                f"target epsilon {target_epsilon} is out of reach with sample rate "
                f"{sample_rate:.4g} and {steps} steps (already spent: "
                f"{epsilon(prior, delta, relation=relation):.3g})"
            )
    while hi - lo > 0.005 * hi:
        mid = (lo + hi) / 2
        if eps_at(mid) > target_epsilon:
            lo = mid
        else:
            hi = mid
    return hi
