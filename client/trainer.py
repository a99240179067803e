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
from dataclasses import dataclass, field
from typing import Any

import torch

from client.data import Examples
from client.dp_plan import DPPlan
from client.loss import per_sequence_loss


@dataclass(frozen=True)
class TrainResult:
    steps: int
    sample_rate: float
    mean_loss: float  # over non-empty steps, before the update
    examples_seen: int
    empty_steps: int  # Poisson draws with no example: noise-only steps under DP
    seconds: float


def make_optimizer(params: list[torch.nn.Parameter], name: str, lr: float) -> torch.optim.Optimizer:
    return (torch.optim.AdamW(params, lr=lr, weight_decay=0.0) if name == "adamw"
            else torch.optim.SGD(params, lr=lr))


def make_private(model: Any, optimizer: torch.optim.Optimizer, *, noise_multiplier: float,
                 clip_norm: float | None, expected_batch: int,
                 noise: torch.Generator | None = None) -> tuple[Any, torch.optim.Optimizer]:
    """(module to call, optimizer): Opacus' per-sample hooks and DP optimizer, or without
    a clipping norm `model` and `optimizer` unchanged. The caller closes the hooks
    (`_close()`)."""
    if clip_norm is None:
        return model, optimizer
    from opacus import GradSampleModule
    from opacus.optimizers import DPOptimizer

    forward = GradSampleModule(model, batch_first=True, loss_reduction="mean")
    return forward, DPOptimizer(optimizer, noise_multiplier=noise_multiplier,
                                max_grad_norm=clip_norm, expected_batch_size=expected_batch,
                                loss_reduction="mean", generator=noise)


def backward(forward: Any, optimizer: torch.optim.Optimizer, batch: Examples, *,
             batch_size: int, private: bool, micro_batch: int = 0,
             chunked_loss: bool = True) -> torch.Tensor:
    """Gradients of one drawn batch, `micro_batch` sequences at a time (0: all at once);
    returns the detached per-sequence losses. Under DP each micro-batch's per-sample
    gradients are clipped and summed by Opacus (a skipped step), so the caller's
    `optimizer.step()` adds the noise once, for the whole batch, as without micro-batches."""
    size = micro_batch if 0 < micro_batch < len(batch) else len(batch)
    losses = []
    for start in range(0, len(batch), size):
        part = batch.select(torch.arange(start, min(start + size, len(batch))))
        if private and start:
            optimizer.zero_grad(set_to_none=True)  # keeps the summed clipped gradients
        per_seq = per_sequence_loss(forward, part, chunked_loss)
        loss = per_seq.mean() if private else per_seq.sum() / batch_size
        with warnings.catch_warnings():  # Opacus' hooks on frozen-input LoRA layers
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            loss.backward()
        losses.append(per_seq.detach())
        if private and start + size < len(batch):
            optimizer.signal_skip_step(do_skip=True)
            optimizer.step()  # clip and accumulate this part; no noise, no update yet
    return torch.cat(losses)


def _drop_hook_state(model: Any) -> None:
    """What Opacus' hooks leave on modules when a step fails between forward and backward
    (captured activations, the batch size): the next client of a shared model must not
    inherit them."""
    for module in model.modules():
        for name in ("activations", "max_batch_len"):
            if hasattr(module, name):
                delattr(module, name)


def train(
    model: Any,
    data: Examples,
    *,
    plan: DPPlan,
    lr: float,
    sampling: torch.Generator,
    noise: torch.Generator | None = None,
    optimizer_name: str = "adamw",
    progress: Callable[[int, float], None] | None = None,
    chunked_loss: bool = True,
    micro_batch: int = 0,
) -> TrainResult:
    """Run the plan's steps on the trainable (LoRA) parameters of `model`: Poisson draws
    at the plan's q, clipped and noised as it says; PlanError unless it is the plan for
    `data` and every charged step ran.

    `progress(step, loss)` is called after each step (loss NaN for an empty draw; it
    stays local).
    `chunked_loss=False` computes the loss from full logits (the reference; slower).
    `micro_batch` > 0 runs a drawn batch through forward/backward that many sequences at
    a time (less activation memory; the same update, the same privacy).
    """
    plan.check_data(len(data))
    start = time.perf_counter()
    params = [p for p in model.parameters() if p.requires_grad]
    forward, optimizer = make_private(
        model, make_optimizer(params, optimizer_name, lr), noise_multiplier=plan.noise_multiplier,
        clip_norm=plan.clip_norm, expected_batch=plan.expected_batch, noise=noise)
    noised: list[int] = []
    if plan.private:
        optimizer.attach_step_hook(lambda _: noised.append(1))  # runs after the noise is added
    model.train()
    try:
        tally = _steps(forward, optimizer, params, data, plan, sampling, progress,
                       micro_batch, chunked_loss)
    finally:
        model.eval()
        optimizer.zero_grad(set_to_none=True)
        if forward is not model:
            forward._close()  # remove Opacus' hooks: the model is reused next round
            _drop_hook_state(model)
    plan.check_ran(len(noised) if plan.private else tally.drawn)
    mean_loss = sum(tally.losses) / len(tally.losses) if tally.losses else math.nan
    return TrainResult(plan.steps, plan.sample_rate, mean_loss, tally.seen, tally.empty,
                       time.perf_counter() - start)


def poisson_draw(num_examples: int, q: float, sampling: torch.Generator) -> torch.Tensor:
    """The indices of one step's Poisson draw: each example independently with chance q."""
    return (torch.rand(num_examples, generator=sampling) < q).nonzero().squeeze(1)


def noise_only(params: list[torch.nn.Parameter]) -> None:
    """An empty draw under DP: empty per-sample gradients, so that the optimizer's step
    still adds the noise (the accounting charged this step)."""
    for p in params:
        p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device)


@dataclass
class _Tally:
    drawn: int = 0
    empty: int = 0
    seen: int = 0
    losses: list[float] = field(default_factory=list)


def _steps(forward: Any, optimizer: torch.optim.Optimizer, params: list[torch.nn.Parameter],
           data: Examples, plan: DPPlan, sampling: torch.Generator,
           progress: Callable[[int, float], None] | None, micro_batch: int,
           chunked_loss: bool) -> _Tally:
    tally = _Tally()
    for step in range(1, plan.steps + 1):
        index = poisson_draw(len(data), plan.sample_rate, sampling)
        tally.drawn += 1
        optimizer.zero_grad(set_to_none=True)
        if len(index) == 0:
            tally.empty += 1
            if not plan.private:
                if progress:
                    progress(step, math.nan)
                continue  # nothing to learn from, and no noise to add
            noise_only(params)
        else:
            per_seq = backward(forward, optimizer, data.select(index),
                               batch_size=plan.expected_batch, private=plan.private,
                               micro_batch=micro_batch, chunked_loss=chunked_loss)
            tally.losses.append(float(per_seq.mean()))
            tally.seen += len(index)
        optimizer.step()
        if progress:
            progress(step, tally.losses[-1] if len(index) else math.nan)
    return tally
