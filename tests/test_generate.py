"""`fedslm generate`: the run's adapter really answers (it changes the base's output),
greedy decoding is deterministic, the answer streams, and a run without an adapter is
one clear line."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch

from client import adapter as adapter_mod
from client import base_model as model_mod
from client.generate import GenerateError, generate, load_run_model
from contracts.rundir import ADAPTER, save_adapter
from fedslm.cli import main


def _run_dir(tmp_path, tiny_model):
    """A run directory as a federation leaves it: its config and a trained adapter."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"model": str(tiny_model), "cache-dir": ""}))
    base, _ = model_mod.load_base(str(tiny_model), model_mod.Quantization(
        "none", "float32", "test"), torch.device("cpu"))
    peft = adapter_mod.attach_lora(base, 4, 8.0, 0.0, ["q_proj", "v_proj"], 0)
    rng = np.random.default_rng(0)
    arrays = {k: (rng.normal(size=v.shape) * 2).astype(np.float32)
              for k, v in adapter_mod.get_adapter(peft).items()}
    save_adapter(run / ADAPTER, arrays, adapter_mod.adapter_config_json(peft, str(tiny_model)))
    return run


def test_greedy_answers_are_deterministic_streamed_and_the_adapters(tmp_path, tiny_model):
    run = _run_dir(tmp_path, tiny_model)
    model, tokenizer = load_run_model(run)
    streamed = io.StringIO()
    first = generate(model, tokenizer, "to be or", max_new_tokens=12, chat=False, out=streamed)
    assert first and streamed.getvalue().strip() == first.strip()
    assert generate(model, tokenizer, "to be or", max_new_tokens=12, chat=False,
                    out=None) == first
    with model.disable_adapter():  # the base alone answers otherwise
        assert generate(model, tokenizer, "to be or", max_new_tokens=12, chat=False,
                        out=None) != first
    sampled = {generate(model, tokenizer, "to be or", max_new_tokens=12, chat=False,
                        temperature=1.5, seed=s, out=None) for s in range(4)}
    assert len(sampled) > 1  # sampling, seeded


def test_the_command_streams_and_a_run_without_adapter_is_refused(tmp_path, tiny_model,
                                                                   capsys):
    run = _run_dir(tmp_path, tiny_model)
    assert main(["generate", str(run), "--prompt", "to be", "--no-chat",
                 "--max-new-tokens", "5"]) == 0
    assert capsys.readouterr().out.strip()
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.json").write_text(json.dumps({"model": str(tiny_model)}))
    assert main(["generate", str(empty), "--prompt", "x"]) == 2
    assert "has no adapter yet" in capsys.readouterr().err
    with pytest.raises(GenerateError, match="not found"):
        load_run_model(tmp_path / "nowhere")
