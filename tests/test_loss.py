"""The chunked LM-head loss against the straightforward full-logits computation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from client import adapter as adapter_mod
from client import base_model as model_mod
from client import data as data_mod
from client import loss as loss_mod

FP32 = model_mod.Quantization("none", "float32", "test")


def _random_case(dtype, n=50, hidden=16, vocab=97):
    gen = torch.Generator().manual_seed(0)
    h = torch.randn(n, hidden, generator=gen).to(dtype).requires_grad_()
    w = torch.randn(vocab, hidden, generator=gen).to(dtype)
    labels = torch.randint(0, vocab, (n,), generator=gen)
    labels[::7] = -100
    upstream = torch.rand(n, generator=gen)
    return h, w, labels, upstream


@pytest.mark.parametrize(("dtype", "tol"), [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_chunked_cross_entropy_equals_full_logits(dtype, tol):
    h, w, labels, upstream = _random_case(dtype)
    ref = F.cross_entropy((h @ w.T).float(), labels, ignore_index=-100, reduction="none")
    (ref * upstream).sum().backward()
    ref_grad, h.grad = h.grad.clone(), None
    got = loss_mod.linear_cross_entropy(h, w, labels, chunk=8)  # 7 chunks, the last short
    (got * upstream).sum().backward()
    # tolerance: fp32 to rounding; bf16 relative to the gradient's scale (bf16 has 8 bits)
    torch.testing.assert_close(got, ref, rtol=tol, atol=tol)
    scale = float(ref_grad.abs().max())
    assert float((h.grad.float() - ref_grad.float()).abs().max()) <= tol * scale
    assert float(got.detach()[labels == -100].abs().max()) == 0.0


def test_chunked_cross_entropy_refuses_a_trainable_head():
    h, w, labels, _ = _random_case(torch.float32)
    with pytest.raises(ValueError, match="frozen"):
        loss_mod.linear_cross_entropy(h, w.requires_grad_(), labels)


def _model_and_batch(tiny_model, text_clients):
    base, tokenizer = model_mod.load_base(str(tiny_model), FP32, torch.device("cpu"))
    model = adapter_mod.attach_lora(base, 4, 8.0, 0.0, ["q_proj", "v_proj"], 0)
    adapter_mod.set_adapter(model, {k: v + 0.02 for k, v in adapter_mod.get_adapter(model).items()})
    train, _ = data_mod.encode(data_mod.partition(str(text_clients), 0), tokenizer, 32, 8)
    batch = train.select(torch.arange(6))
    batch.labels[0, 20:] = -100  # a partly labelled sequence
    return model, batch


def test_model_loss_and_lora_gradients_match_the_reference(tiny_model, text_clients,
                                                           monkeypatch):
    monkeypatch.setattr(loss_mod, "CHUNK_ELEMENTS", 40 * 384)  # several chunks per batch
    model, batch = _model_and_batch(tiny_model, text_clients)
    assert loss_mod._parts(model) is not None, "the tiny Llama should take the chunked path"
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    results = []
    for chunked in (False, True):
        model.zero_grad()
        per_seq = loss_mod.per_sequence_loss(model, batch, chunked)
        per_seq.sum().backward()
        results.append((per_seq.detach(), {n: p.grad.clone() for n, p in params.items()}))
    (ref_loss, ref_grads), (loss, grads) = results
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    for name in params:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-4, atol=1e-7)
    assert max(float(g.abs().max()) for g in grads.values()) > 0


def test_evaluation_statistics_match_the_reference(tiny_model, text_clients, monkeypatch):
    monkeypatch.setattr(loss_mod, "CHUNK_ELEMENTS", 40 * 384)
    model, batch = _model_and_batch(tiny_model, text_clients)
    ref = loss_mod.token_stats(model, batch, chunked=False)
    got = loss_mod.token_stats(model, batch)
    assert got[1:] == ref[1:]
    assert got[0] == pytest.approx(ref[0], rel=1e-5)
    assert ref[1] == int((batch.labels[:, 1:] != -100).sum())


def test_a_trainable_head_falls_back_to_full_logits(tiny_model, text_clients):
    base, tokenizer = model_mod.load_base(str(tiny_model), FP32, torch.device("cpu"))
    model = adapter_mod.attach_lora(base, 4, 8.0, 0.0, ["q_proj", "v_proj"], 0)
    model.get_base_model().lm_head.weight.requires_grad_(True)
    assert loss_mod._parts(model) is None


def test_padding_columns_are_trimmed_without_changing_the_loss(tiny_model, text_clients):
    model, batch = _model_and_batch(tiny_model, text_clients)
    pad = 9
    padded = data_mod.Examples(
        torch.cat([batch.input_ids, torch.zeros(len(batch), pad, dtype=torch.long)], 1),
        torch.cat([batch.attention_mask, torch.zeros(len(batch), pad, dtype=torch.long)], 1),
        torch.cat([batch.labels, torch.full((len(batch), pad), -100)], 1))
    assert padded.trimmed().input_ids.shape == batch.input_ids.shape
    with torch.no_grad():
        torch.testing.assert_close(loss_mod.per_sequence_loss(model, padded),
                                   loss_mod.per_sequence_loss(model, batch))
    assert loss_mod.token_stats(model, padded) == loss_mod.token_stats(model, batch)


@pytest.mark.parametrize("change", [{"model_type": "granite"}, {"logits_scaling": 8.0},
                                    {"final_logit_softcapping": 30.0}])
def test_models_with_scaled_or_unknown_heads_take_the_full_logits_path(tiny_model, change):
    base, _ = model_mod.load_base(str(tiny_model), FP32, torch.device("cpu"))
    for key, value in change.items():
        setattr(base.config, key, value)
    assert loss_mod._parts(base) is None
