"""`fedslm export`: the merged model equals adapter + base, loads without PEFT, and the
GGUF file reads back (gguf's reader, transformers' GGUF loader) with the same logits
within each quantisation's tolerance."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from client.export import ExportError, export, merged_model
from client.generate import load_run_model
from fedslm.cli import main
from tests.test_generate import _run_dir

IDS = torch.tensor([[5, 17, 42, 8, 99, 3, 64, 21, 7, 12]])


def _logits(model) -> np.ndarray:
    with torch.no_grad():
        return model(input_ids=IDS).logits.float().numpy()


@pytest.fixture(scope="module")
def adapted(tmp_path_factory, tiny_model):
    run = _run_dir(tmp_path_factory.mktemp("export"), tiny_model)
    model, _ = load_run_model(run, dtype="float32")
    return run, _logits(model)


def test_the_merged_folder_is_adapter_plus_base_without_peft(adapted, tmp_path):
    run, expected = adapted
    out = export(run, tmp_path / "hf", "safetensors")
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert not hasattr(merged, "peft_config")
    np.testing.assert_allclose(_logits(merged), expected, atol=1e-4)
    assert (out / "tokenizer.json").is_file()


def _quantised(model, quant: str):
    """The merged model with each 2-D weight quantised and dequantised as the GGUF holds it."""
    import gguf

    qtype = gguf.GGMLQuantizationType[quant.upper()]
    state = {k: torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(v.numpy(), qtype),
                                                        qtype).reshape(v.shape).copy())
             if v.ndim == 2 else v for k, v in model.state_dict().items()}
    model.load_state_dict(state)
    return model


@pytest.mark.parametrize("quant, drift", [("f16", 0.01), ("q8_0", 0.15), ("q4_0", 1.0)])
def test_the_gguf_reads_back_with_the_same_logits(adapted, tmp_path, quant, drift):
    """Read back by gguf's reader and by transformers' GGUF loader, the model is exactly
    the merged one with its weights at that quantisation (1e-4); how far the quantisation
    itself moves this random tiny model's logits is bounded loosely (`drift`)."""
    import gguf

    run, expected = adapted
    path = export(run, tmp_path / "gguf", "gguf", quant)
    reader = gguf.GGUFReader(path)
    kinds = {t.name: t.tensor_type.name for t in reader.tensors}
    assert kinds["blk.0.attn_q.weight"] == quant.upper() and kinds["output_norm.weight"] == "F32"
    assert "output.weight" not in kinds  # a tied head: llama.cpp reads token_embd
    back = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                dtype=torch.float32)
    got = _logits(back)
    np.testing.assert_allclose(got, _logits(_quantised(merged_model(run)[0], quant)),
                               atol=1e-4)
    assert np.linalg.norm(got - expected) / np.linalg.norm(expected) < drift


def test_export_refuses_to_overwrite_and_names_bad_choices(adapted, tmp_path, capsys):
    run, _ = adapted
    full = tmp_path / "full"
    full.mkdir()
    (full / "mine.txt").write_text("keep")
    assert main(["export", str(run), "--to", str(full)]) == 2
    assert "exists and is not empty" in capsys.readouterr().err
    with pytest.raises(ExportError, match="unknown GGUF quantisation 'q2'"):
        export(run, tmp_path / "x", "gguf", "q2")
