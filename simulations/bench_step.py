"""One benchmark case in a process of its own: load, warm up, time training steps.

Run by `fedslm bench` as `python -m simulations.bench_step '<json list of cases>'`;
prints a JSON line per case. The full benchmark gives each case a fresh process, so
that its peak-memory figure is its own; the quick mode runs them all in one.
"""

from __future__ import annotations

import json
import resource
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch

from client import adapter as adapter_mod
from client import base_model as model_mod
from client import data as data_mod
from client.settings import micro_batch
from client.trainer import backward, make_optimizer, make_private


def _rss_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _reset_peak() -> bool:
    try:  # Linux: "5" resets the peak resident set size (VmHWM) of this process
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def _batches(case: dict[str, Any], tokenizer) -> list[data_mod.Examples]:
    part = data_mod.partition(case["data"], 0)
    examples = data_mod.encode_all(part, tokenizer, case["seq_len"])
    b = case["batch"]
    count = max(1, min(len(examples) // b, 8))
    return [examples.select(torch.arange(i * b, (i + 1) * b) % len(examples))
            for i in range(count)]


def _hf_loss(model, batch: data_mod.Examples) -> torch.Tensor:
    """What a plain Hugging Face fine-tune computes: full fp32 logits, mean token loss."""
    return model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                 labels=batch.labels).loss


def _load(case: dict[str, Any]):
    """(LoRA model, batches, device); an `auto` quantization is resolved as the client
    does, and the case records what it became."""
    torch.manual_seed(0)
    torch.set_num_threads(case["threads"])
    source = model_mod.prepare_base(case["model"])
    device = model_mod.pick_device(case.get("device", "auto"))
    if case["quantization"] == "auto":
        quant = model_mod.choose_quantization("auto", device, model_mod.count_params(source))
        case.update(quantization=quant.mode, dtype=quant.dtype, resolved=quant.reason)
    quant = model_mod.Quantization(case["quantization"], case["dtype"], "bench")
    base, tokenizer = model_mod.load_base(source, quant, device)
    case["micro_batch"] = micro_batch(case.get("micro_batch_tokens", 0), case["seq_len"],
                                      case["dtype"])
    model = adapter_mod.attach_lora(base, case["lora_r"], 2.0 * case["lora_r"], 0.0,
                                  ["q_proj", "v_proj"], 0)
    return model, [b.to(device) for b in _batches(case, tokenizer)], device


def run(case: dict[str, Any]) -> dict[str, Any]:
    started = time.perf_counter()
    model, batches, device = _load(case)
    load_seconds = time.perf_counter() - started
    rss_loaded = _rss_mb("VmRSS")
    params = [p for p in model.parameters() if p.requires_grad]
    forward, optimizer = make_private(model, make_optimizer(params, "adamw", 1e-4),
                                      noise_multiplier=1.0,
                                      clip_norm=1.0 if case["dp"] else None,
                                      expected_batch=case["batch"],
                                      noise=torch.Generator().manual_seed(1))

    def step(i: int) -> None:
        batch = batches[i % len(batches)]
        _step(case, forward, optimizer, batch)

    model.train()
    peak_load = _rss_mb("VmHWM")
    reset = _reset_peak()  # from here VmHWM is the training's own peak
    warnings.filterwarnings("ignore", message="Full backward hook is firing")
    for i in range(case["warmup"]):
        step(i)
    flops = _count_flops(step) if case.get("flops") else 0
    times, cpu = [], time.process_time()
    for i in range(case["steps"]):
        times.append(_timed(device, step, i))
    cpu = time.process_time() - cpu
    seconds = sorted(times)[len(times) // 2]
    return {
        **case,
        "step_s": seconds,
        "step_s_mean": sum(times) / len(times),
        "cpu_s_per_step": cpu / len(times),
        "samples_per_s": case["batch"] / seconds,
        "flops_per_step": flops,
        "peak_train_mb": _rss_mb("VmHWM") if reset else float("nan"),
        "peak_process_mb": max(peak_load, _rss_mb("VmHWM")),
        "rss_loaded_mb": rss_loaded,
        "gpu_peak_mb": torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else 0,
        "load_s": load_seconds,
        "trainable": sum(p.numel() for p in params),
    }


def _timed(device: torch.device, fn, *args) -> float:
    """Wall seconds of fn(*args), the GPU's queued work included."""
    start = time.perf_counter()
    fn(*args)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def _step(case: dict[str, Any], forward, optimizer, batch: data_mod.Examples) -> None:
    optimizer.zero_grad(set_to_none=True)
    if case["loss"] == "hf":
        _hf_loss(forward, batch).backward()
    else:
        backward(forward, optimizer, batch, batch_size=case["batch"], private=case["dp"],
                 micro_batch=case.get("micro_batch", 0), chunked_loss=case["loss"] == "chunked")
    optimizer.step()


def run_pair(pair: dict[str, Any]) -> dict[str, Any]:
    """Cases `a` and `b`, each on its own model, timed step by step in turn in one process,
    so that their ratio does not carry the machine's drift between processes. A DP step
    wraps its model in Opacus' hooks and DP optimizer first and unwraps it after (neither
    timed), so a plain step never runs with hooks attached."""
    loaded = [_load(pair["a"]), _load(pair["b"])]
    warnings.filterwarnings("ignore", message="Full backward hook is firing")
    times: list[list[float]] = [[], []]
    for i in range(2 * (pair["a"]["warmup"] + pair["a"]["steps"])):
        which = i % 2
        case, (model, batches, device) = (pair["a"], pair["b"])[which], loaded[which]
        params = [p for p in model.parameters() if p.requires_grad]
        forward, optimizer = make_private(model, make_optimizer(params, "adamw", 1e-4),
                                          noise_multiplier=1.0,
                                          clip_norm=1.0 if case["dp"] else None,
                                          expected_batch=case["batch"],
                                          noise=torch.Generator().manual_seed(i))
        model.train()
        seconds = _timed(device, _step, case, forward, optimizer,
                         batches[(i // 2) % len(batches)])
        if i >= 2 * pair["a"]["warmup"]:
            times[which].append(seconds)
        if forward is not model:
            optimizer.zero_grad(set_to_none=True)
            forward._close()
    a_s, b_s = (sorted(t)[len(t) // 2] for t in times)
    return {**pair, "a_s": a_s, "b_s": b_s, "ratio": b_s / a_s}


def _count_flops(step) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        step(0)
    return counter.get_total_flops()


if __name__ == "__main__":
    for one in json.loads(sys.argv[1]):
        print(json.dumps(run_pair(one) if "a" in one else run(one)), flush=True)
