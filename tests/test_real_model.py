"""The embedded SmolLM2-135M-Instruct: cached once, loads fast, and still talks."""

from __future__ import annotations

import time

import pytest
import torch

from client import adapter as adapter_mod
from client import base_model as model_mod

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def source() -> str:
    return model_mod.prepare_base("embedded")  # builds the cache on first use (~20 s)


def test_the_cached_model_loads_fast_and_generates(source):
    start = time.perf_counter()
    quant = model_mod.choose_quantization("none", torch.device("cpu"), 0)
    model, tokenizer = model_mod.load_base(source, quant, torch.device("cpu"))
    load_seconds = time.perf_counter() - start
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert not hasattr(model.config, "quantization_config")
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                        return_dict=True)
    out = model.generate(**ids, max_new_tokens=12, do_sample=False)
    answer = tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer, answer
    print(f"cached load {load_seconds:.2f}s; answer: {answer!r}")


def test_lora_attaches_to_the_real_model(source):
    quant = model_mod.choose_quantization("none", torch.device("cpu"), 0)
    model, _ = model_mod.load_base(source, quant, torch.device("cpu"))
    peft_model = adapter_mod.attach_lora(model, 8, 16, 0.0, ["q_proj", "v_proj"], seed=0)
    arrays = adapter_mod.get_adapter(peft_model)
    assert len(arrays) == 30 * 2 * 2
    assert sum(v.size for v in arrays.values()) == 460_800
