"""Every quantization mode loads, trains under DP and moves the adapter; `auto` is recorded."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from client import adapter as adapter_mod
from client import base_model as model_mod
from client.cache import Session
from client.rounds import train_round
from tests.helpers import client_settings


@pytest.mark.parametrize("mode", ["none", "int8", "nf4"])
def test_each_mode_trains_under_dp(mode, tiny_model, text_clients, tmp_path):
    Session.forget()
    s = client_settings(tiny_model, text_clients, tmp_path, quantization=mode, lora_r=4)
    initial = adapter_mod.get_adapter(Session.get(s).model)
    arrays, metrics, info = train_round(s, {})
    assert info["quantization"] == mode
    assert metrics["noise-multiplier"] > 0 and 0 < metrics["epsilon"] <= 8
    assert all(np.isfinite(v).all() for v in arrays.values())
    assert any(not np.allclose(arrays[k], initial[k]) for k in arrays)
    linear = type(Session.get(s).model.base_model.model.model.layers[0].self_attn.q_proj.base_layer)
    expected = {"none": "Linear", "int8": "Linear8bitLt", "nf4": "Linear4bit"}[mode]
    assert linear.__name__ == expected
    Session.forget()


def test_auto_picks_by_device_and_memory(monkeypatch):
    cpu = torch.device("cpu")
    assert model_mod.choose_quantization("auto", cpu, 10**6).mode == "none"
    monkeypatch.setattr(model_mod, "available_memory_bytes", lambda d: 100 * 2**20)
    assert model_mod.choose_quantization("auto", cpu, 10 * 2**20).mode == "int8"
    assert model_mod.choose_quantization("auto", cpu, 20 * 2**20).mode == "nf4"
    chosen = model_mod.choose_quantization("int8", cpu, 10**9)
    assert (chosen.mode, chosen.reason) == ("int8", "requested")
    with pytest.raises(model_mod.ModelError, match="unknown quantization 'fp8'"):
        model_mod.choose_quantization("fp8", cpu, 1)
