"""The frozen-prefix cache (client/frozen_prefix.py) against the full model: the same
per-sequence losses, LoRA gradients, per-sample gradients under DP with clipping active,
evaluation sums and training result."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from client import adapter as adapter_mod
from client import base_model as model_mod
from client import data as data_mod
from client import frozen_prefix
from client import loss as loss_mod
from client.cache import with_frozen_prefix
from client.dp_plan import DPPlan
from client.evaluation import evaluate
from client.trainer import backward, make_optimizer, make_private, train

TARGETS = ["q_proj", "v_proj", "down_proj"]
FP32 = model_mod.Quantization("none", "float32", "test")


def _tiny(model_type: str, layers: int = 4) -> torch.nn.Module:
    import transformers

    config_class = transformers.AutoConfig.for_model(model_type).__class__
    config = config_class(vocab_size=101, hidden_size=32, intermediate_size=64,
                          num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                          head_dim=8, max_position_embeddings=64, tie_word_embeddings=True,
                          pad_token_id=0, use_cache=False)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).float()
    return model.requires_grad_(False).eval()


def _lora(base: torch.nn.Module, top: int) -> torch.nn.Module:
    model = adapter_mod.attach_lora(base, 4, 8.0, 0.0, TARGETS, 0, layers=top)
    moved = {k: v + np.float32(0.05) * (i % 3 + 1)
             for i, (k, v) in enumerate(adapter_mod.get_adapter(model).items())}
    adapter_mod.set_adapter(model, moved)  # B non-zero: the adapter changes the outputs
    return model


def _batch(rows: int = 6, width: int = 20) -> data_mod.Examples:
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 101, (rows, width), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, 12:] = 0  # right padding, as the data module packs short rows
    mask[4, 5:] = 0
    ids = ids.masked_fill(mask == 0, 0)
    return data_mod.Examples(ids, mask, ids.masked_fill(mask == 0, -100))


def _cached(model, batch: data_mod.Examples) -> data_mod.Examples:
    layer = frozen_prefix.first_trained_layer(model)
    assert layer > 0
    return batch.with_prefix(frozen_prefix.lower_outputs(model, batch.input_ids,
                                                         batch.attention_mask, layer), layer)


def _loss_and_grads(model, batch, chunked):
    model.zero_grad()
    per_seq = loss_mod.per_sequence_loss(model, batch, chunked)
    (per_seq * torch.arange(1, len(batch) + 1)).sum().backward()
    return per_seq.detach(), {n: p.grad.clone() for n, p in model.named_parameters()
                              if p.requires_grad}


@pytest.mark.parametrize("model_type", sorted(frozen_prefix.SUPPORTED))
@pytest.mark.parametrize("chunked", [True, False])
def test_cached_prefix_gives_the_full_models_losses_and_gradients(model_type, chunked):
    model = _lora(_tiny(model_type), top=2)
    batch = _batch()
    assert frozen_prefix.first_trained_layer(model) == 2
    ref_loss, ref_grads = _loss_and_grads(model, batch, chunked)
    loss, grads = _loss_and_grads(model, _cached(model, batch), chunked)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    assert set(grads) == set(ref_grads) and len(grads) == 2 * 2 * len(TARGETS)
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-4, atol=1e-7)
    assert min(float(g.abs().max()) for g in grads.values()) > 0
    assert len(frozen_prefix.decoder_of(model).layers) == 4  # the layer list is restored


def _per_sample(model, batch, clip):
    optimizer = make_optimizer([p for p in model.parameters() if p.requires_grad], "sgd", 0.1)
    forward, dp_opt = make_private(model, optimizer, noise_multiplier=0.0, clip_norm=clip,
                                   expected_batch=len(batch))
    try:
        backward(forward, dp_opt, batch, batch_size=len(batch), private=True)
        samples = {n: p.grad_sample.clone() for n, p in model.named_parameters()
                   if p.requires_grad}
        dp_opt.pre_step()  # clip, sum and (noise 0) average: what the step applies
        clipped = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    finally:
        forward._close()
    return samples, clipped


def test_per_sample_gradients_under_dp_with_clipping_match():
    model = _lora(_tiny("llama"), top=2)
    batch = _batch()
    ref_samples, ref_clipped = _per_sample(model, batch, clip=1e-3)
    samples, clipped = _per_sample(model, _cached(model, batch), clip=1e-3)
    norms = torch.stack([g.flatten(1).norm(dim=1) for g in ref_samples.values()]).norm(dim=0)
    assert float(norms.min()) > 1e-2, "the clip norm must bind for every example"
    for name in ref_samples:
        torch.testing.assert_close(samples[name], ref_samples[name], rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(clipped[name], ref_clipped[name], rtol=1e-4, atol=1e-9)


def test_dp_training_and_evaluation_from_the_cache_equal_the_full_model():
    batch = _batch(rows=24)
    plan = DPPlan.for_data(num_examples=len(batch), batch_size=6, steps=4,
                           noise_multiplier=0.7, clip_norm=0.05)
    adapters, sums = [], []
    for cached in (False, True):
        model = _lora(_tiny("llama"), top=2)
        data = _cached(model, batch) if cached else batch
        train(model, data, plan=plan, lr=0.05, sampling=torch.Generator().manual_seed(3),
              noise=torch.Generator().manual_seed(4), optimizer_name="adamw", micro_batch=4)
        adapters.append(adapter_mod.get_adapter(model))
        sums.append(evaluate(model, data, batch_size=5))
    for key in adapters[0]:
        np.testing.assert_allclose(adapters[1][key], adapters[0][key], rtol=1e-4, atol=1e-6)
    assert sums[1].tokens == sums[0].tokens and sums[1].correct == sums[0].correct
    assert sums[1].loss_sum == pytest.approx(sums[0].loss_sum, rel=1e-5)
    start = adapter_mod.get_adapter(_lora(_tiny("llama"), top=2))
    assert max(float(np.abs(adapters[1][k] - start[k]).max()) for k in start) > 1e-3


def test_the_cache_is_attached_only_where_lower_layers_are_frozen(tiny_model, text_clients):
    base, tokenizer = model_mod.load_base(str(tiny_model), FP32, torch.device("cpu"))
    train_set, heldout = data_mod.encode(data_mod.partition(str(text_clients), 0), tokenizer,
                                         32, 8)
    everywhere = adapter_mod.attach_lora(base, 4, 8.0, 0.0, ["q_proj"], 0)
    assert with_frozen_prefix(everywhere, "c", train_set, heldout) == (train_set, heldout)
    base, _ = model_mod.load_base(str(tiny_model), FP32, torch.device("cpu"))
    top = adapter_mod.attach_lora(base, 4, 8.0, 0.0, ["q_proj"], 0, layers=1)
    cached_train, cached_heldout = with_frozen_prefix(top, "c", train_set, heldout)
    assert cached_train.prefix.shape == (len(train_set), 32, 64)
    assert cached_train.prefix_layer == cached_heldout.prefix_layer == 1
    assert cached_train.select(torch.tensor([2, 0])).prefix.shape == (2, 32, 64)


def test_unsupported_decoders_and_bad_layer_counts():
    gemma = _lora(_tiny("llama"), top=2)
    gemma.get_base_model().config.model_type = "gemma"  # scales its input embeddings
    assert frozen_prefix.first_trained_layer(gemma) == 0
    with pytest.raises(model_mod.ModelError, match="lora-layers is 5 but the model has 4"):
        adapter_mod.attach_lora(_tiny("llama"), 4, 8.0, 0.0, TARGETS, 0, layers=5)
