"""`fedslm export`: a run's adapter merged into its base, for runtimes without PEFT.

- `safetensors`: a plain Hugging Face model folder (weights, config, tokenizer, chat
  template) that `AutoModelForCausalLM.from_pretrained` loads without PEFT.
- `gguf`: one GGUF file for llama.cpp and the runtimes built on it, written with the
  `gguf` package (ggml's own Python writer): its tensor-name map, tokenizer readers and
  quantisers (`f16`, `q8_0`, `q4_0`; 1-D tensors stay f32, as llama.cpp's converter
  keeps them). Llama-architecture models only (SmolLM2 is one); Q and K are permuted
  to GGML's rotary layout as llama.cpp's `convert_hf_to_gguf.py` does.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from client.generate import load_run_model
from contracts.errors import FedslmError

QUANTS = ("f16", "q8_0", "q4_0")
FORMATS = ("safetensors", "gguf")


class ExportError(FedslmError):
    """An export that cannot be written as asked."""


def export(run_dir: Path, to: Path, fmt: str = "safetensors", quant: str = "q8_0") -> Path:
    """Write the merged model to `to` (a new or empty folder); the path written."""
    if fmt not in FORMATS:
        raise ExportError(f"unknown export format {fmt!r} (known: {', '.join(FORMATS)})")
    if quant not in QUANTS:
        raise ExportError(f"unknown GGUF quantisation {quant!r} (known: {', '.join(QUANTS)})")
    if to.exists() and any(to.iterdir()):
        raise ExportError(f"{to} exists and is not empty: export to a new folder")
    merged, tokenizer = merged_model(run_dir)
    if fmt == "safetensors":
        merged.save_pretrained(to)
        tokenizer.save_pretrained(to)
        return to
    out = to / f"{run_dir.resolve().name}-{quant}.gguf"
    to.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as files:  # gguf's readers take tokenizer files
        tokenizer.save_pretrained(files)
        write_gguf(merged, Path(files), out, quant)
    return out


def merged_model(run_dir: Path) -> tuple[Any, Any]:
    """The base with the run's adapter folded into its weights (fp32), and its tokenizer."""
    model, tokenizer = load_run_model(run_dir, dtype="float32")  # the base's exact weights
    return model.merge_and_unload().eval(), tokenizer


def write_gguf(model: Any, tokenizer_dir: Path, out: Path, quant: str) -> None:
    import gguf

    config = model.config
    if config.model_type != "llama":
        raise ExportError(f"GGUF export supports llama-architecture models; this one is "
                          f"{config.model_type!r} (export --format safetensors instead)")
    qtype = {"f16": gguf.GGMLQuantizationType.F16, "q8_0": gguf.GGMLQuantizationType.Q8_0,
             "q4_0": gguf.GGMLQuantizationType.Q4_0}[quant]
    writer = gguf.GGUFWriter(out, "llama")
    _metadata(writer, config, quant, gguf)
    _vocab(writer, tokenizer_dir, gguf)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue  # llama.cpp reads the token embeddings for a tied head
        gguf_name = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise ExportError(f"no GGUF name for tensor {name!r}")
        data = _ggml_layout(gguf_name, tensor.numpy(), config)
        if data.ndim == 1 or data.shape[-1] % 32:  # norms, and rows the blocks do not fit
            writer.add_tensor(gguf_name, data.astype(np.float32))
        else:
            writer.add_tensor(gguf_name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _metadata(writer: Any, config: Any, quant: str, gguf: Any) -> None:
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    writer.add_name("fedslm export")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_dimension_count(config.hidden_size // heads)
    writer.add_rope_freq_base(float(getattr(config, "rope_theta", None) or
                                    config.rope_parameters["rope_theta"]))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type({"f16": gguf.LlamaFileType.MOSTLY_F16,
                          "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
                          "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0}[quant])


def _vocab(writer: Any, tokenizer_dir: Path, gguf: Any) -> None:
    """A GPT-2 style byte-level BPE (SmolLM2's), its merges, special ids, chat template."""
    try:
        vocab = gguf.vocab.BpeVocab(tokenizer_dir)
    except (FileNotFoundError, ValueError) as exc:
        raise ExportError(f"GGUF export needs a byte-level BPE tokenizer ({exc})") from None
    tokens, _, types = zip(*vocab.all_tokens(), strict=True)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(list(tokens))
    writer.add_token_types(list(types))
    gguf.SpecialVocab(tokenizer_dir, load_merges=True, n_vocab=len(tokens)).add_to_gguf(
        writer, quiet=True)


def _ggml_layout(gguf_name: str, data: np.ndarray, config: Any) -> np.ndarray:
    """Q and K rows reordered for GGML's rotary layout (llama.cpp's `permute`)."""
    if ".attn_q." in gguf_name:
        return _permute(data, config.num_attention_heads)
    if ".attn_k." in gguf_name:
        return _permute(data, config.num_key_value_heads)
    return data


def _permute(weights: np.ndarray, heads: int) -> np.ndarray:
    return (weights.reshape(heads, 2, weights.shape[0] // heads // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))
