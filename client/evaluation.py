"""Held-out metrics: loss, perplexity and next-token accuracy."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from client.data import Examples
from client.loss import per_sequence_loss, token_stats


@dataclass(frozen=True)
class EvalSums:
    """Sums that aggregate across clients by adding; ratios are taken at the end."""

    loss_sum: float  # total next-token cross-entropy (nats)
    tokens: int
    correct: int

    @property
    def loss(self) -> float:
        return self.loss_sum / self.tokens if self.tokens else math.nan


def perplexity(loss: float) -> float:
    return math.exp(loss) if loss < 700 else math.inf


@torch.inference_mode()
def evaluate(model: Any, data: Examples, batch_size: int = 8) -> EvalSums:
    model.eval()
    stats = [token_stats(model, data.select(torch.arange(i, min(i + batch_size, len(data)))))
             for i in range(0, len(data), batch_size)]
    return EvalSums(sum(s[0] for s in stats), sum(s[1] for s in stats),
                    sum(s[2] for s in stats))


@torch.inference_mode()
def per_example_loss(model: Any, data: Examples, batch_size: int = 32) -> np.ndarray:
    """Mean next-token cross-entropy of each example (shape [N])."""
    model.eval()
    out = [per_sequence_loss(model, data.select(torch.arange(i, min(i + batch_size, len(data)))))
           for i in range(0, len(data), batch_size)]
    return torch.cat(out).float().cpu().numpy()
