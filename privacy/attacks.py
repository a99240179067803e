"""Empirical privacy: membership inference on planted canaries and the one-run ε lower
bound of Steinke, Nasr and Jagielski, "Privacy Auditing with One (1) Training Run"
(NeurIPS 2023). Statistics only (numpy and the standard library): the scores come from
whoever ran the model.

m canaries are each included in the training data with probability 1/2. After
training, every canary gets a score (here: how much the model's loss on it dropped).
The auditor guesses "included" for the k highest scores and "excluded" for the k lowest
and abstains on the rest. For an (ε, δ)-DP mechanism the number of correct guesses is
nearly dominated by Binomial(2k, e^ε / (1 + e^ε)) (their Theorem 3.1, with a δ term),
so an observed count that this makes unlikely (p < 5%) proves ε is larger. The bound
is computed at the accountant's δ. m canaries can certify at most `ceiling(m)`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

CONFIDENCE = 0.95
GUESS_FRACTION = 0.25  # k = m/4 guesses on each side, fixed before looking at the scores


def auc(scores: Sequence[float], members: Sequence[bool]) -> float:
    """Probability that a random member outscores a random non-member (ties count half)."""
    s, m = np.asarray(scores, float), np.asarray(members, bool)
    pos, neg = s[m], s[~m]
    if not len(pos) or not len(neg):
        return math.nan
    greater = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return float(greater / (len(pos) * len(neg)))


def tpr_at_fpr(scores: Sequence[float], members: Sequence[bool], fpr: float = 0.01) -> float:
    """Share of members scored above the threshold that lets at most `fpr` of non-members pass."""
    s, m = np.asarray(scores, float), np.asarray(members, bool)
    neg = np.sort(s[~m])[::-1]
    allowed = int(math.floor(fpr * len(neg)))
    threshold = neg[allowed] if allowed < len(neg) else -math.inf
    return float((s[m] > threshold).mean()) if m.any() else math.nan


def exposure(rank: int, candidates: int) -> float:
    """Secret-sharer exposure (Carlini et al., 2019): log2(candidates) - log2(rank)."""
    return math.log2(candidates) - math.log2(rank)


def _binomial_pmf(n: int, p: float, k: int) -> float:
    return math.comb(n, k) * p**k * (1 - p) ** (n - k) if 0 <= k <= n else 0.0


def p_value(m: int, guesses: int, correct: int, eps: float, delta: float = 0.0) -> float:
    """P[>= `correct` right out of `guesses`] for an (ε, δ)-DP mechanism over m canaries
    (Steinke, Nasr and Jagielski, Theorem 3.1): P[Binomial(r, p) >= v] plus
    2mδ · max_i P[v > Binomial(r, p) >= v - i] / i, with p = e^ε / (1 + e^ε)."""
    p = 1 / (1 + math.exp(-eps))
    tail = sum(_binomial_pmf(guesses, p, i) for i in range(correct, guesses + 1))
    worst, below = 0.0, 0.0
    for i in range(1, correct + 1):
        below += _binomial_pmf(guesses, p, correct - i)
        worst = max(worst, below / i)
    return min(1.0, tail + 2 * m * delta * worst)


def lower_bound(m: int, guesses: int, correct: int, confidence: float = CONFIDENCE,
                delta: float = 0.0) -> float:
    """The largest ε that `correct` right guesses refute at `confidence` (0: none)."""
    alpha = 1 - confidence
    if p_value(m, guesses, correct, 0.0, delta) >= alpha:
        return 0.0
    lo, hi = 0.0, 50.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if p_value(m, guesses, correct, mid, delta) < alpha else (lo, mid)
    return lo


def guesses_for(m: int) -> int:
    """2k: k = m/4 guesses on each side, fixed before looking at the scores."""
    return 2 * max(1, int(m * GUESS_FRACTION))


def ceiling(m: int, confidence: float = CONFIDENCE, delta: float = 0.0) -> float:
    """The largest ε m canaries can certify at all: every guess right. With 200 at 95%,
    about 3.5: an accountant's ε above it cannot be refuted by this audit, however
    leaky the training."""
    r = guesses_for(m)
    return lower_bound(m, r, r, confidence, delta)


def one_run_lower_bound(scores: Sequence[float], members: Sequence[bool],
                        confidence: float = CONFIDENCE,
                        delta: float = 0.0) -> tuple[float, int, int]:
    """(ε lower bound, guesses, correct guesses) at the given confidence, for an
    (ε, δ)-DP claim (δ as the accountant's)."""
    s, m = np.asarray(scores, float), np.asarray(members, bool)
    guesses = guesses_for(len(s))
    k = guesses // 2
    order = np.argsort(s, kind="stable")
    correct = int(m[order[-k:]].sum() + (~m[order[:k]]).sum())
    return lower_bound(len(s), guesses, correct, confidence, delta), guesses, correct
