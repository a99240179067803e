"""`max-update-norm = auto`: per reply, the most an honest client's local training can
move the adapter it was sent (L2 norm), so that a larger update is rejected as poisoned.

A client (client/trainer.py) runs exactly `local-steps` steps of a fresh optimizer, AdamW
(weight decay 0, torch's default betas and eps) or plain SGD, on what it was sent; under
DP each step's gradient is (the sum of the drawn examples' gradients, each clipped to
`clip-norm` C, + N(0, σ²C²I)) / `batch-size` B. These keys come from the server's config
(a node cannot override them); P is the number of values the update holds, which under
ffa-lora and hetlora is what the client trained and sent.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from contracts.wire import NOISE_MULTIPLIER, NUM_EXAMPLES

BETAS = (0.9, 0.999)  # torch.optim.AdamW's defaults, which the client uses
GAUSSIAN_TAIL = 7.5  # P(|N(0, I_P)| > sqrt(P) + t) <= exp(-t²/2) = 6.1e-13
# int8-delta (contracts/codec.py) decodes each value within scale/2 = max|block|/254 of
# the client's change: a block's error is at most sqrt(128)/254 = 0.0446 of that block's
# norm, so the whole decoded change is at most 1.0446 times the client's. 1.05 also
# covers float32 rounding.
CODEC_SLACK = 1.05


def adam_step_bound(t: int, betas: tuple[float, float] = BETAS) -> float:
    """The most one coordinate moves at Adam's step t (1-based), in units of lr, for any
    gradients: |m̂_t| / sqrt(v̂_t) <= b_t, and eps only shrinks the step.

    With m_t = (1-β1) Σ_i β1^(t-i) g_i and v_t = (1-β2) Σ_i β2^(t-i) g_i², Cauchy-Schwarz
    on Σ_i (β1/sqrt(β2))^(t-i) · sqrt(β2)^(t-i)|g_i| gives
    |m_t| <= (1-β1)/sqrt(1-β2) · sqrt(Σ_{k<t} (β1²/β2)^k) · sqrt(v_t); the bias
    corrections add sqrt(1-β2^t)/(1-β1^t). b_1 = 1; b_6 = 1.016; b_50 = 1.61.
    """
    b1, b2 = betas
    geometric = sum((b1 * b1 / b2) ** k for k in range(t))
    return (1 - b1) / math.sqrt(1 - b2) * math.sqrt(geometric) \
        * math.sqrt(1 - b2 ** t) / (1 - b1 ** t)


def _claim(metrics: dict[str, float], key: str) -> float:
    """A number the client reported; 0 when it is missing, negative or not finite."""
    value = metrics.get(key, 0.0)
    return float(value) if isinstance(value, int | float) and 0 <= value < math.inf else 0.0


@dataclass(frozen=True)
class AutoNorm:
    """The run's local training, as far as it bounds an update."""

    optimizer: str
    lr: float
    steps: int
    batch_size: int
    clip_norm: float | None  # None: trained without DP

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> AutoNorm:
        return cls(config["optimizer"], config["lr"], config["local-steps"],
                   config["batch-size"], config["clip-norm"] if config["dp"] else None)

    def __call__(self, metrics: dict[str, float], values: int) -> float:
        """The bound for an update of `values` numbers from a client that reported
        `metrics`; inf where there is none (SGD without DP).

        AdamW: every coordinate moves at most lr·b_t at step t, whatever the gradients:
        lr·sqrt(P)·Σ_t b_t. SGD: ||Δ|| <= lr·Σ_t ||g_t||, and with probability
        1 - 6.1e-13 per step ||g_t|| <= (m·C + σ·C·(sqrt(P) + 7.5)) / B, with m the most
        examples one Poisson draw holds (poisson_draw_bound, and at most the client's n).
        n and σ are the client's own claims
        (`num-examples` and `noise-multiplier` in its reply), which the server cannot
        check: a client that overstates them widens its own bound.
        """
        if self.optimizer == "adamw":
            per_value = self.lr * sum(adam_step_bound(t) for t in range(1, self.steps + 1))
            return CODEC_SLACK * per_value * math.sqrt(values)
        if self.clip_norm is None:
            return math.inf
        n, sigma = _claim(metrics, NUM_EXAMPLES), _claim(metrics, NOISE_MULTIPLIER)
        drawn = min(n, poisson_draw_bound(self.batch_size))
        step = (drawn + sigma * (math.sqrt(values) + GAUSSIAN_TAIL)) * self.clip_norm \
            / self.batch_size
        return CODEC_SLACK * self.lr * self.steps * step


def poisson_draw_bound(batch_size: int) -> float:
    """The most examples a Poisson draw of expected size B holds, but with probability
    below 1e-12: the count is Binomial(n, B/n), and Bernstein's inequality gives
    P(X >= B + t) <= exp(-t² / (2(B + t/3))); t solves t² = 2·ln(1e12)·(B + t/3)."""
    log_odds = 2 * math.log(1e12)
    t = log_odds / 6 + math.sqrt((log_odds / 6) ** 2 + log_odds * batch_size)
    return batch_size + t
