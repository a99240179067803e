"""LoRA on the top layers only: the frozen lower layers run once per example, not per step.

With adapters in decoder layers L.. only, layers 0..L-1 and the embedding are frozen, and
the causal LM computes each example's hidden state after layer L-1 from that example
alone. It is computed once per client (`lower_outputs`), kept in the client's memory next
to its tokenised data, and every training step and evaluation runs layers L.. and the
head on it (`upper_only`). Losses and per-example gradients are those of the full model
(tests/test_frozen_prefix.py); Poisson sampling, clipping, noise and accounting are
untouched, since a step still sees exactly the drawn examples. The cached states are
private data: they never leave the process.

The upper pass reuses the decoder's own forward with `inputs_embeds` and its layer list
cut to the top layers, so rotary positions and the attention mask are the model's own.
That is exact for decoders that use `inputs_embeds` as given and the same attention in
every layer (SUPPORTED); others train the whole model as before.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

# Decoders whose forward takes inputs_embeds verbatim (Gemma scales them) and whose
# layers all share one attention mask (checked again on the config's layer_types).
SUPPORTED = {"llama", "mistral", "qwen2", "qwen3"}
BATCH = 16  # sequences per forward while filling the cache


class _Reached(Exception):  # noqa: N818 - control flow, not an error
    def __init__(self, hidden: torch.Tensor) -> None:
        self.hidden = hidden


def base_of(model: Any) -> Any:
    """The transformers model inside Opacus' and PEFT's wrappers."""
    inner = getattr(model, "_module", model)  # Opacus' GradSampleModule
    return inner.get_base_model() if hasattr(inner, "get_base_model") else inner


def decoder_of(model: Any) -> Any | None:
    base = base_of(model)
    return base.get_decoder() if hasattr(base, "get_decoder") else None


def first_trained_layer(model: Any) -> int:
    """The lowest decoder layer with a trainable parameter; 0 when the cache cannot apply
    (an unsupported decoder, trainable embeddings, or adapters in every layer)."""
    config = getattr(base_of(model), "config", None)
    decoder = decoder_of(model)
    if config is None or decoder is None or not hasattr(decoder, "layers") \
            or getattr(config, "model_type", None) not in SUPPORTED \
            or len(set(getattr(config, "layer_types", None) or ["one"])) > 1:
        return 0
    if any(p.requires_grad for p in decoder.get_input_embeddings().parameters()):
        return 0
    for index, layer in enumerate(decoder.layers):
        if any(p.requires_grad for p in layer.parameters()):
            return index
    return 0


@torch.no_grad()
def lower_outputs(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                  layer: int) -> torch.Tensor:
    """Hidden states after decoder layer `layer - 1` for every row: [N, T, H], in the
    model's compute dtype. The forward stops there: the upper layers do not run."""
    decoder = decoder_of(model)
    handle = decoder.layers[layer - 1].register_forward_hook(_stop)
    parts = []
    try:
        for start in range(0, len(input_ids), BATCH):
            rows = slice(start, start + BATCH)
            try:
                decoder(input_ids=input_ids[rows], attention_mask=attention_mask[rows],
                        use_cache=False)
            except _Reached as reached:
                parts.append(reached.hidden)
            else:  # pragma: no cover - the hook always fires
                raise RuntimeError("the frozen prefix hook did not fire")
    finally:
        handle.remove()
    return torch.cat(parts)


def _stop(_module: Any, _inputs: Any, output: Any) -> None:
    raise _Reached((output[0] if isinstance(output, tuple) else output).detach())


@contextmanager
def upper_only(model: Any, layer: int) -> Iterator[Any]:
    """The decoder with only layers `layer`.. in place; restored on exit."""
    decoder = decoder_of(model)
    everything = decoder.layers
    decoder.layers = torch.nn.ModuleList(list(everything)[layer:])
    try:
        yield decoder
    finally:
        decoder.layers = everything


def describe(layer: int, total: int, train: int, heldout: int) -> str:
    return (f"frozen layers 0..{layer - 1} of {total} run once for {train} train and "
            f"{heldout} held-out sequences; each step runs layers {layer}..{total - 1}")
