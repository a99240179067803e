"""Next-token cross-entropy without materialising the logits.

The LM head of a small model is its largest layer (SmolLM2-135M: 49,152 x 576),
and the straightforward loss keeps [batch, seq, vocab] logits in fp32 together with
their log-softmax and its gradient: hundreds of MB and most of the step's memory
traffic. Here the head is applied to a few hundred positions at a time; each chunk's
logits give its loss and, in the same pass, the gradient with respect to the hidden
states (softmax - one-hot) @ W, so nothing vocabulary-wide outlives its chunk and the
backward pass is a multiply. The head must be frozen (it is under LoRA), so no
gradient for its weight is needed. Per-example gradients stay exact, which is what
Opacus' per-sample hooks on the LoRA layers see.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F

from client import frozen_prefix
from client.data import Examples

CHUNK_ELEMENTS = 1 << 22  # logits per chunk: 4M fp32 values = 16 MB


def _chunk_size(weight: torch.Tensor) -> int:
    return max(1, CHUNK_ELEMENTS // weight.shape[0])


def _logit_chunks(hidden: torch.Tensor, weight: torch.Tensor, chunk: int):
    """(start, end, fp32 logits of hidden[start:end]) a chunk at a time."""
    for start in range(0, hidden.shape[0], chunk):
        end = min(start + chunk, hidden.shape[0])
        yield start, end, (hidden[start:end].to(weight.dtype) @ weight.T).float()


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                chunk: int, with_grad: bool) -> torch.Tensor:
        loss = torch.zeros(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        grad = torch.empty(hidden.shape, dtype=torch.float32, device=hidden.device) \
            if with_grad else None
        for start, end, logits in _logit_chunks(hidden, weight, chunk):
            target = labels[start:end]
            valid = target != -100
            index = target.clamp(min=0).unsqueeze(1)
            lse = torch.logsumexp(logits, dim=1)
            loss[start:end] = torch.where(valid, lse - logits.gather(1, index).squeeze(1), 0.0)
            if grad is not None:
                probs = logits.sub_(lse.unsqueeze(1)).exp_()
                probs.scatter_add_(1, index, torch.full_like(lse, -1.0).unsqueeze(1))
                probs.mul_(valid.unsqueeze(1))
                grad[start:end] = probs.to(weight.dtype) @ weight
        ctx.save_for_backward(grad if grad is not None else loss.new_empty(0))
        ctx.hidden_dtype = hidden.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        (grad,) = ctx.saved_tensors
        return (grad * grad_loss.unsqueeze(1)).to(ctx.hidden_dtype), None, None, None, None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                         chunk: int | None = None) -> torch.Tensor:
    """Cross-entropy of `labels` [N] (-100: ignored, loss 0) under logits hidden [N, H] @ weight.T.

    Equal to F.cross_entropy(hidden @ weight.T, labels, reduction="none") with fp32
    softmax; `weight` must not require a gradient.
    """
    if weight.requires_grad:
        raise ValueError("linear_cross_entropy needs a frozen output layer")
    chunk = chunk or _chunk_size(weight)
    with_grad = torch.is_grad_enabled() and hidden.requires_grad
    return _LinearCrossEntropy.apply(hidden, weight, labels, chunk, with_grad)


# Causal LMs whose logits are exactly lm_head(final hidden state): no scaling, no
# softcapping (Granite divides by logits_scaling, Gemma 2 caps, Cohere scales). Others
# take the full-logits path.
PLAIN_HEAD_MODELS = {"llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3",
                     "qwen3_moe", "phi3", "smollm3", "olmo", "olmo2", "gemma", "stablelm",
                     "starcoder2"}
SCALING_KEYS = ("final_logit_softcapping", "logit_scale", "logits_scaling",
                "output_multiplier_scale")


def _parts(model):
    """(decoder, output weight) when the chunked loss applies to `model`, else None."""
    base = frozen_prefix.base_of(model)
    config = getattr(base, "config", None)
    if config is None or getattr(config, "model_type", None) not in PLAIN_HEAD_MODELS:
        return None
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    if any(getattr(c, key, None) not in (None, 1, 1.0) for c in (config, text)
           for key in SCALING_KEYS):
        return None
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    decoder = base.get_decoder() if hasattr(base, "get_decoder") else None
    if not isinstance(head, torch.nn.Linear) or head.bias is not None or decoder is None \
            or head.weight.requires_grad or head.weight.dtype not in (torch.float32,
                                                                      torch.bfloat16,
                                                                      torch.float16):
        return None
    return decoder, head.weight


def _head_inputs(model, batch: Examples, chunked: bool):
    """(labels [B, T-1], and either full logits [B, T-1, V] in fp32 or None, and either
    (hidden [B*(T-1), H], head weight) or None): one forward of the trimmed batch, from
    its cached frozen-layer states when it has them (client/frozen_prefix.py)."""
    batch = batch.trimmed()
    labels = batch.labels[:, 1:]
    parts = _parts(model) if chunked else None
    with _inputs(model, batch) as inputs:
        if parts is None:
            logits = model(**inputs, attention_mask=batch.attention_mask).logits
            return labels, logits[:, :-1].float(), None
        decoder, weight = parts
        hidden = decoder(**inputs, attention_mask=batch.attention_mask)[0]
    return labels, None, (hidden[:, :-1].reshape(-1, hidden.shape[-1]), weight)


@contextmanager
def _inputs(model, batch: Examples) -> Iterator[dict[str, torch.Tensor]]:
    if batch.prefix is None:
        yield {"input_ids": batch.input_ids}
        return
    with frozen_prefix.upper_only(model, batch.prefix_layer):
        yield {"inputs_embeds": batch.prefix}


def token_losses(model: Any, batch: Examples,
                 chunked: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(cross-entropy of each next token [B, T-1] in fp32, 0 where unlabelled; label mask).

    `chunked=False` is the straightforward computation (full logits), kept as the
    reference the chunked one is tested against and as the fallback for heads it
    does not handle (softcapping, scaled or trainable heads).
    """
    labels, logits, head = _head_inputs(model, batch, chunked)
    if head is None:
        ce = F.cross_entropy(logits.transpose(1, 2), labels, ignore_index=-100,
                             reduction="none")
    else:
        ce = linear_cross_entropy(*head, labels.reshape(-1)).view_as(labels)
    return ce, labels != -100


def per_sequence_loss(model: Any, batch: Examples, chunked: bool = True) -> torch.Tensor:
    """Mean next-token cross-entropy of each sequence, in fp32: shape [B]."""
    ce, valid = token_losses(model, batch, chunked)
    return ce.sum(dim=1) / valid.sum(dim=1).clamp(min=1)


@torch.no_grad()
def token_stats(model: Any, batch: Examples, chunked: bool = True) -> tuple[float, int, int]:
    """(summed cross-entropy, labelled tokens, correctly predicted tokens) of a batch."""
    labels, logits, head = _head_inputs(model, batch, chunked)
    valid = labels != -100
    if head is None:
        ce = F.cross_entropy(logits.transpose(1, 2), labels, ignore_index=-100, reduction="sum")
        return float(ce), int(valid.sum()), int(((logits.argmax(-1) == labels) & valid).sum())
    hidden, weight = head
    flat, mask = labels.reshape(-1), valid.reshape(-1)
    loss, correct = 0.0, 0
    for start, end, logits in _logit_chunks(hidden, weight, _chunk_size(weight)):
        target, keep = flat[start:end], mask[start:end]
        ce = torch.logsumexp(logits, 1) - logits.gather(1, target.clamp(min=0)[:, None])[:, 0]
        loss += float(ce[keep].sum())
        correct += int(((logits.argmax(1) == target) & keep).sum())
    return loss, int(valid.sum()), correct
