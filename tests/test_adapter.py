"""Adapters: seeded init, a round really changes them, and they survive the trip to PEFT."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from client import adapter as adapter_mod
from client import base_model as model_mod
from client.base_model import ModelError
from client.cache import Session
from client.rounds import train_round
from contracts.config import DEFAULTS
from contracts.rundir import save_adapter
from server.strategies import fedavg
from tests.helpers import client_settings

FP32 = model_mod.Quantization("none", "float32", "test")


def _lora(tiny_model, seed=0, r=4):
    """The adapter a client starts from with the default LoRA targets."""
    base, _ = model_mod.load_base(str(tiny_model), FP32, torch.device("cpu"))
    return adapter_mod.attach_lora(base, r, 8.0, 0.0, DEFAULTS["lora-targets"].split(","), seed)


def test_initial_adapter_depends_on_the_seed_only(tiny_model):
    a, b, c = (adapter_mod.get_adapter(_lora(tiny_model, s)) for s in (3, 3, 4))
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert any(not np.array_equal(a[k], c[k]) for k in a if "lora_A" in k)
    assert all(not a[k].any() for k in a if "lora_B" in k)  # B = 0: starts as the base model


def test_a_round_changes_the_adapter_and_the_aggregate_round_trips_through_peft(
        tiny_model, text_clients, tmp_path):
    from peft import PeftModel, get_peft_model_state_dict

    initial = adapter_mod.get_adapter(_lora(tiny_model))
    updates = []
    for partition in (0, 1):
        Session.forget()
        s = client_settings(tiny_model, text_clients, tmp_path / "state", partition_id=partition,
                            lora_r=4)
        arrays, metrics, info = train_round(s, {})
        assert set(arrays) == set(initial)
        assert any(not np.allclose(arrays[k], initial[k]) for k in arrays if "lora_B" in k)
        updates.append((arrays, metrics["num-examples"]))
    aggregate = fedavg(updates)
    save_adapter(tmp_path / "adapter", aggregate, info["adapter-config"])

    base, _ = model_mod.load_base(str(tiny_model), FP32, torch.device("cpu"))
    loaded = PeftModel.from_pretrained(base, tmp_path / "adapter")
    state = get_peft_model_state_dict(loaded)
    assert set(state) == set(aggregate)
    for key, value in aggregate.items():
        np.testing.assert_array_equal(state[key].numpy(), value)


def test_an_incompatible_adapter_is_refused_by_name(tiny_model):
    model = _lora(tiny_model)
    arrays = adapter_mod.get_adapter(model)
    key = next(iter(arrays))
    with pytest.raises(ModelError, match="incompatible adapter: .*shape"):
        adapter_mod.set_adapter(model, {**arrays, key: np.zeros((1, 1), np.float32)})
    with pytest.raises(ModelError, match="incompatible adapter: 0 unexpected and 1"):
        adapter_mod.set_adapter(model, {k: v for k, v in arrays.items() if k != key})
    with pytest.raises(ModelError, match="incompatible adapter: 1 unexpected"):
        adapter_mod.set_adapter(model, {**arrays, "x.lora_A.weight": arrays[key]})


def test_fedavg_is_the_example_weighted_mean():
    a = {"w": np.array([1.0, 2.0], np.float32)}
    b = {"w": np.array([4.0, 8.0], np.float32)}
    out = fedavg([(a, 1), (b, 3)])
    np.testing.assert_allclose(out["w"], [3.25, 6.5])
    with pytest.raises(ValueError, match="disagree"):
        fedavg([(a, 1), ({"v": a["w"]}, 1)])
