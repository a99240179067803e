"""`fedslm generate`: a run's global adapter on its base model, answering a prompt.

The prompt is wrapped in the model's chat template as one user turn (unless `chat` is
off or the tokenizer has none); tokens stream to `out` as they are decided. Greedy by
default (temperature 0: the same answer every time); a temperature > 0 samples, seeded.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, TextIO

import torch

from client import base_model as model_mod
from contracts.environment import default_cache_dir
from contracts.errors import FedslmError
from contracts.rundir import ADAPTER, ADAPTER_WEIGHTS, RunDirError, read_config


class GenerateError(FedslmError):
    """A run directory that holds no adapter to generate with."""


def load_run_model(run_dir: Path, device: str = "cpu",
                   dtype: str | None = None) -> tuple[Any, Any]:
    """(the base model with the run's adapter, in eval mode; its tokenizer). `dtype`:
    the weights' (default: the device's compute dtype, bf16 where it is native)."""
    from peft import PeftModel

    try:
        config = read_config(run_dir)
    except RunDirError as exc:
        raise GenerateError(str(exc)) from None
    adapter = Path(run_dir) / ADAPTER
    if not (adapter / ADAPTER_WEIGHTS).is_file():
        raise GenerateError(f"{run_dir} has no adapter yet (no round has trained)")
    cache = Path(config.get("cache-dir") or default_cache_dir())
    source = model_mod.prepare_base(config["model"], cache)
    where = torch.device(device)
    dtype = dtype or str(model_mod.compute_dtype(where)).removeprefix("torch.")
    base, tokenizer = model_mod.load_base(source, model_mod.Quantization("none", dtype,
                                                                         "generate"), where)
    with warnings.catch_warnings():  # a deprecation notice from inside PEFT's loading
        warnings.simplefilter("ignore", FutureWarning)
        return PeftModel.from_pretrained(base, adapter).eval(), tokenizer


def generate(model: Any, tokenizer: Any, prompt: str, *, max_new_tokens: int = 64,
             temperature: float = 0.0, top_p: float = 1.0, seed: int = 0, chat: bool = True,
             out: TextIO | None = None) -> str:
    """The answer to `prompt` (streamed to `out` as it is generated; None: quiet)."""
    text = prompt
    if chat and getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                             tokenize=False, add_generation_prompt=True)
    inputs = tokenizer(text, return_tensors="pt", add_special_tokens=False).to(model.device)
    streamer = _Streamer(tokenizer, out) if out is not None else None
    sampling = temperature > 0
    torch.manual_seed(seed)
    with torch.no_grad():
        ids = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=sampling,
                             temperature=temperature if sampling else None,
                             top_p=top_p if sampling else None, top_k=None,
                             streamer=streamer, pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(ids[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)


def _Streamer(tokenizer: Any, out: TextIO) -> Any:  # noqa: N802 (a class made on demand)
    from transformers import TextStreamer

    class Streamer(TextStreamer):
        def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
            out.write(text + ("\n" if stream_end else ""))
            out.flush()

    return Streamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
