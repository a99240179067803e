"""DP-SGD against plain training, noise, empty Poisson draws, and the adapter moving."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from client import adapter as adapter_mod
from client import base_model as model_mod
from client import data as data_mod
from client.dp_plan import DPPlan
from client.loss import per_sequence_loss
from client.trainer import train

FP32 = model_mod.Quantization("none", "float32", "test")


def _dp(noise_multiplier: float, clip_norm: float) -> dict:
    return {"noise_multiplier": noise_multiplier, "clip_norm": clip_norm}


def _plan(examples, dp, steps, batch) -> DPPlan:
    return DPPlan.for_data(num_examples=len(examples), batch_size=batch, steps=steps,
                           **(dp or {}))


def _lora_model(tiny_model, seed=0):
    base, tokenizer = model_mod.load_base(str(tiny_model), FP32, torch.device("cpu"))
    return adapter_mod.attach_lora(base, 4, 8.0, 0.0, ["q_proj", "v_proj"], seed), tokenizer


def _examples(tiny_model, text_clients, seq_len=32):
    model, tokenizer = _lora_model(tiny_model)
    part = data_mod.partition(str(text_clients), 0)
    return data_mod.encode(part, tokenizer, seq_len, max_heldout=8)[0]


def _run(tiny_model, examples, dp, steps=3, optimizer="sgd", batch=8, noise_seed=1, micro=0):
    model, _ = _lora_model(tiny_model)
    before = adapter_mod.get_adapter(model)
    result = train(model, examples, plan=_plan(examples, dp, steps, batch), lr=0.5,
                   sampling=torch.Generator().manual_seed(7),
                   noise=torch.Generator().manual_seed(noise_seed), optimizer_name=optimizer,
                   micro_batch=micro)
    after = adapter_mod.get_adapter(model)
    return before, after, result


def _max_diff(a, b):
    return max(float(np.abs(a[k] - b[k]).max()) for k in a)


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_dp_with_no_noise_and_no_clipping_equals_plain_training(tiny_model, text_clients,
                                                               optimizer):
    examples = _examples(tiny_model, text_clients)
    before, plain, _ = _run(tiny_model, examples, None, optimizer=optimizer)
    _, private, _ = _run(tiny_model, examples, _dp(0.0, 1e9), optimizer=optimizer)
    moved = _max_diff(before, plain)
    assert moved > 1e-4, "plain training did not move the adapter"
    # float32 sums in a different order: equal to ~1e-7 of the update (Adam amplifies
    # rounding where a gradient is near zero, hence the looser bound there)
    assert _max_diff(plain, private) <= (1e-6 if optimizer == "sgd" else 1e-4) * moved


def test_per_sample_gradients_match_per_example_autograd(tiny_model, text_clients, monkeypatch):
    """Opacus' per-sample gradients of the LoRA layers equal one backward per example
    (through the chunked loss, with several chunks per batch)."""
    from opacus import GradSampleModule

    from client import loss as loss_mod

    monkeypatch.setattr(loss_mod, "CHUNK_ELEMENTS", 50 * 384)

    examples = _examples(tiny_model, text_clients).select(torch.arange(4))
    model, _ = _lora_model(tiny_model)
    adapter_mod.set_adapter(model, {k: v + 0.01 for k, v in adapter_mod.get_adapter(model).items()})
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    expected = []
    for i in range(len(examples)):
        model.zero_grad()
        per_sequence_loss(model, examples.select(torch.tensor([i]))).sum().backward()
        expected.append({n: p.grad.clone() for n, p in params.items()})
    gsm = GradSampleModule(model, batch_first=True, loss_reduction="sum")
    model.zero_grad()
    per_sequence_loss(gsm, examples).sum().backward()
    for name, p in params.items():
        for i in range(len(examples)):
            torch.testing.assert_close(p.grad_sample[i], expected[i][name], rtol=1e-4, atol=1e-6)
    gsm._close()


@pytest.mark.parametrize("dp", [None, _dp(1.0, 0.05)], ids=["plain", "dp"])
def test_micro_batches_give_the_same_update(tiny_model, text_clients, dp):
    """Splitting each drawn batch (clipping active, noise on) changes memory, not the update."""
    examples = _examples(tiny_model, text_clients)
    before, whole, result = _run(tiny_model, examples, dp)
    _, split, split_result = _run(tiny_model, examples, dp, micro=3)
    assert result.examples_seen == split_result.examples_seen > 3 * result.steps
    moved = _max_diff(before, whole)
    assert moved > 1e-4
    assert _max_diff(whole, split) <= 1e-5 * moved


def test_noise_changes_the_update(tiny_model, text_clients):
    examples = _examples(tiny_model, text_clients)
    _, plain, _ = _run(tiny_model, examples, None)
    _, noisy, _ = _run(tiny_model, examples, _dp(1.0, 1.0))
    _, noisy_again, _ = _run(tiny_model, examples, _dp(1.0, 1.0), noise_seed=2)
    assert _max_diff(plain, noisy) > 1e-3
    assert _max_diff(noisy, noisy_again) > 1e-3, "noise did not depend on its generator"


def test_clipping_bounds_each_example(tiny_model, text_clients):
    """With one example per step, no noise and SGD, each step moves at most lr * C / B."""
    examples = _examples(tiny_model, text_clients).select(torch.arange(1))
    clip, lr = 1e-3, 0.5
    model, _ = _lora_model(tiny_model)
    before = adapter_mod.get_adapter(model)
    train(model, examples, plan=_plan(examples, _dp(0.0, clip), 1, 1), lr=lr,
          sampling=torch.Generator().manual_seed(0), optimizer_name="sgd")
    after = adapter_mod.get_adapter(model)
    step = np.sqrt(sum(float(((after[k] - before[k]) ** 2).sum()) for k in before))
    assert 0 < step <= lr * clip * 1.0001


def test_empty_poisson_draws_still_take_a_noise_step(tiny_model, text_clients):
    examples = _examples(tiny_model, text_clients).select(torch.arange(20))
    before, after, result = _run(tiny_model, examples, _dp(1.0, 1.0), steps=12, batch=1)
    assert result.empty_steps > 0
    assert result.sample_rate == pytest.approx(1 / 20)
    assert all(np.isfinite(v).all() for v in after.values())
    assert _max_diff(before, after) > 0

    _, plain_after, plain = _run(tiny_model, examples, None, steps=12, batch=1)
    assert plain.empty_steps == result.empty_steps  # the same draws without DP


def test_a_failed_step_leaves_no_captured_activations_on_the_model(tiny_model, text_clients,
                                                                    monkeypatch):
    """A process reuses its model for the next client: Opacus' per-step state must go."""
    from client import trainer

    examples = _examples(tiny_model, text_clients)
    model, _ = _lora_model(tiny_model)

    def forward_then_fail(*args, **kwargs):
        trainer_loss(*args, **kwargs)  # Opacus' hooks capture this batch's activations
        raise RuntimeError("out of memory")

    trainer_loss = trainer.per_sequence_loss
    monkeypatch.setattr(trainer, "per_sequence_loss", forward_then_fail)
    with pytest.raises(RuntimeError, match="out of memory"):
        train(model, examples, plan=_plan(examples, _dp(1.0, 1.0), 1, 8), lr=0.5,
              sampling=torch.Generator().manual_seed(7))
    assert not [n for n, m in model.named_modules()
                if hasattr(m, "activations") or hasattr(m, "max_batch_len")]
