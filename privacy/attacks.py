"""Empirical privacy: membership inference on planted canaries and the one-run ε lower
bound of Steinke, Nasr and Jagielski, "Privacy Auditing with One (1) Training Run"
(NeurIPS 2023). Statistics only (numpy and the standard library): the scores come from
whoever ran the model.

m canaries are each included in the training data with probability 1/2. After
training, every canary gets a score (here: how much the model's loss on it dropped).
The auditor guesses "included" for the k highest scores and "excluded" for the k lowest
and abstains on the rest. For an ε-DP mechanism the number of correct guesses is
stochastically dominated by Binomial(2k, e^ε / (1 + e^ε)) (their Theorem 3.1 with δ = 0),
so an observed count that this binomial makes unlikely (p < 5%) proves ε is larger.
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


def _binomial_tail(n: int, p: float, k: int) -> float:
    """P[Binomial(n, p) >= k]."""
    return float(sum(math.comb(n, i) * p**i * (1 - p) ** (n - i) for i in range(k, n + 1)))


def one_run_lower_bound(scores: Sequence[float], members: Sequence[bool],
                        confidence: float = CONFIDENCE) -> tuple[float, int, int]:
    """(ε lower bound, guesses, correct guesses) at the given confidence."""
    s, m = np.asarray(scores, float), np.asarray(members, bool)
    k = max(1, int(len(s) * GUESS_FRACTION))
    order = np.argsort(s, kind="stable")
    correct = int(m[order[-k:]].sum() + (~m[order[:k]]).sum())
    guesses = 2 * k
    alpha = 1 - confidence

    def tail(eps: float) -> float:
        return _binomial_tail(guesses, math.exp(eps) / (1 + math.exp(eps)), correct)

    if tail(0.0) >= alpha:
        return 0.0, guesses, correct
    lo, hi = 0.0, 50.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if tail(mid) < alpha else (lo, mid)
    return lo, guesses, correct
