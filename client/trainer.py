"""Local training: DP-SGD (Opacus) over LoRA parameters, with Poisson sampling.

Each step draws every example independently with probability q = batch/N (the
sampling the accountant assumes), takes per-sequence losses, and averages over
the *expected* batch size. With DP, Opacus clips each example's gradient to
`clip_norm` and adds N(0, (σ·clip_norm)²) noise; an empty draw still takes a
noise-only step. Without DP the same sampling and the same normalisation are
used, so noise 0 and an unreachable clip norm reproduce plain training.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from client.data import Examples


@dataclass(frozen=True)
class DPSettings:
    noise_multiplier: float
    clip_norm: float


@dataclass(frozen=True)
class TrainResult:
    steps: int
    sample_rate: float
    mean_loss: float  # over non-empty steps, before the update
    examples_seen: int
    empty_steps: int  # Poisson draws with no example: noise-only steps under DP
    seconds: float


def sample_rate(num_examples: int, batch_size: int) -> float:
    return min(1.0, batch_size / num_examples)


def per_sequence_loss(model, batch: Examples) -> torch.Tensor:
    """Mean next-token cross-entropy of each sequence, in fp32: shape [B]."""
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    labels = batch.labels[:, 1:]
    ce = F.cross_entropy(
        logits[:, :-1].float().transpose(1, 2), labels, ignore_index=-100, reduction="none"
    )
    return ce.sum(dim=1) / (labels != -100).sum(dim=1).clamp(min=1)


def train(
    model,
    data: Examples,
    steps: int,
    batch_size: int,
    lr: float,
    dp: DPSettings | None,
    sampling: torch.Generator,
    noise: torch.Generator | None = None,
    optimizer_name: str = "adamw",
    progress: Callable[[int, float], None] | None = None,
) -> TrainResult:
    """Run `steps` optimiser steps on the trainable (LoRA) parameters of `model`.

    `progress(step, loss)` is called after each step with data (the loss stays local).
    """
    from opacus import GradSampleModule
    from opacus.optimizers import DPOptimizer

    start = time.perf_counter()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = (torch.optim.AdamW(params, lr=lr, weight_decay=0.0) if optimizer_name == "adamw"
                 else torch.optim.SGD(params, lr=lr))
    forward = model
    if dp is not None:
        forward = GradSampleModule(model, batch_first=True, loss_reduction="mean")
        optimizer = DPOptimizer(
            optimizer,
            noise_multiplier=dp.noise_multiplier,
            max_grad_norm=dp.clip_norm,
            expected_batch_size=batch_size,
            loss_reduction="mean",
            generator=noise,
        )
    q = sample_rate(len(data), batch_size)
    losses, seen, empty = [], 0, 0
    model.train()
    try:
        for step in range(1, steps + 1):
            index = (torch.rand(len(data), generator=sampling) < q).nonzero().squeeze(1)
            optimizer.zero_grad(set_to_none=True)
            if len(index) == 0:
                empty += 1
                if dp is None:
                    continue  # nothing to learn from, and no noise to add
                for p in params:  # a noise-only step keeps the accounting honest
                    p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device)
            else:
                per_seq = per_sequence_loss(forward, data.select(index))
                loss = per_seq.mean() if dp is not None else per_seq.sum() / batch_size
                with warnings.catch_warnings():  # Opacus' hooks on frozen-input LoRA layers
                    warnings.filterwarnings("ignore", message="Full backward hook is firing")
                    loss.backward()
                losses.append(float(per_seq.detach().mean()))
                seen += len(index)
                if progress:
                    progress(step, losses[-1])
            optimizer.step()
    finally:
        model.eval()
        optimizer.zero_grad(set_to_none=True)
        if dp is not None:
            forward._close()  # remove Opacus' hooks: the model is reused next round
    mean_loss = sum(losses) / len(losses) if losses else math.nan
    return TrainResult(steps, q, mean_loss, seen, empty, time.perf_counter() - start)
