"""The LoRA adapter on the base model: attach it, give it the shared seeded start,
freeze A where the strategy keeps it, and move its tensors in and out."""

from __future__ import annotations

import json
import zlib
from typing import Any

import numpy as np
import torch

from client.base_model import ModelError, missing_targets
from contracts.adapter import LORA, Arrays, cut_to_rank, is_lora_a, spec


def attach_lora(model: Any, r: int, alpha: float, dropout: float, targets: list[str],
                seed: int, layers: int = 0) -> Any:
    """Wrap `model` with a LoRA adapter whose initial weights depend on `seed` only, in
    its top `layers` decoder layers (0: every layer).

    A is filled from a CPU generator in a fixed order (Kaiming-uniform, as PEFT
    does) and B is zero, so every client, on any device, starts from the same
    adapter, and the adapter starts as the identity.
    """
    from peft import LoraConfig, get_peft_model

    missing_targets(model, targets)
    config = LoraConfig(
        r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets,
        bias="none", task_type="CAUSAL_LM", **_top_layers(model, layers),
    )
    peft_model = get_peft_model(model, config)
    reset_adapter(peft_model, seed)
    return peft_model


def _top_layers(model: Any, layers: int) -> dict[str, Any]:
    """PEFT's arguments that put the adapter in the top `layers` decoder layers."""
    if not layers:
        return {}
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") \
        else model.config
    total = int(config.num_hidden_layers)
    if layers > total:
        raise ModelError(f"lora-layers is {layers} but the model has {total} decoder layers")
    return {"layers_to_transform": list(range(total - layers, total)),
            "layers_pattern": "layers"}


def attach_for_strategy(model: Any, strategy: str, r: int, alpha: float, dropout: float,
                        targets: list[str], seed: int, layers: int = 0) -> Any:
    """`attach_lora`, with A frozen when the strategy does not train it."""
    peft_model = attach_lora(model, r, alpha, dropout, targets, seed, layers)
    if not spec(strategy).trains_a:
        freeze_lora_a(peft_model)
    return peft_model


def reset_adapter(peft_model: Any, seed: int) -> None:
    """The shared seeded start: A uniform in +-1/sqrt(fan_in), B zero. Each module draws
    from its own generator, row by row, so that a rank-r start is the first r rows of a
    larger rank's start (what HetLoRA's truncation relies on)."""
    with torch.no_grad():
        for name, param in sorted(_lora_params(peft_model).items()):
            if is_lora_a(name):
                gen = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
                bound = 1.0 / np.sqrt(param.shape[1])
                values = torch.rand(param.shape, generator=gen, dtype=torch.float32)
                param.copy_((values * 2 - 1) * bound)
            else:
                param.zero_()


def freeze_lora_a(peft_model: Any) -> None:
    """A stays at its shared seeded start (FFA-LoRA); only B trains."""
    for name, param in _lora_params(peft_model).items():
        if is_lora_a(name):
            param.requires_grad_(False)


def _lora_params(peft_model: Any) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in peft_model.named_parameters() if LORA in n}


def get_adapter(peft_model: Any) -> Arrays:
    """The adapter's tensors, by PEFT state-dict key, as float32 arrays."""
    from peft import get_peft_model_state_dict

    state = get_peft_model_state_dict(peft_model)
    return {k: v.detach().float().cpu().numpy().copy() for k, v in sorted(state.items())}


def set_adapter(peft_model: Any, arrays: Arrays) -> None:
    """Load adapter tensors; refuse any key or shape that does not fit this model."""
    from peft import set_peft_model_state_dict

    expected = {k: v.shape for k, v in get_adapter(peft_model).items()}
    unknown = sorted(set(arrays) - set(expected))
    missing = sorted(set(expected) - set(arrays))
    if unknown or missing:
        bad = (unknown or missing)[0]
        raise ModelError(
            f"incompatible adapter: {len(unknown)} unexpected and {len(missing)} missing "
            f"tensors (e.g. {bad})"
        )
    for key, shape in expected.items():
        if tuple(arrays[key].shape) != tuple(shape):
            raise ModelError(
                f"incompatible adapter: {key} has shape {tuple(arrays[key].shape)}, "
                f"expected {tuple(shape)}"
            )
    state = {k: torch.from_numpy(np.asarray(v, dtype=np.float32)) for k, v in arrays.items()}
    set_peft_model_state_dict(peft_model, state)


def load_global(peft_model: Any, arrays: Arrays, *, strategy: str, rank: int, seed: int) -> None:
    """The server's adapter or, given none, the shared seeded start. A strategy that keeps
    A at its start is sent only B; a global adapter of larger rank is cut to `rank`."""
    trains_a = spec(strategy).trains_a
    if not arrays or not trains_a:
        reset_adapter(peft_model, seed)
    if arrays:
        if not trains_a:
            arrays = {**get_adapter(peft_model), **arrays}
        set_adapter(peft_model, cut_to_rank(arrays, rank))


def adapter_config_json(peft_model: Any, base_name: str) -> str:
    """PEFT's adapter_config.json for this adapter, naming `base_name` as its base."""
    config = peft_model.peft_config["default"].to_dict()
    config["base_model_name_or_path"] = base_name
    return json.dumps(config, default=lambda o: sorted(o) if isinstance(o, set) else str(o))
