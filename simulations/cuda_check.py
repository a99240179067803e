"""One check of the client's training path on a device: NF4 base + LoRA + DP-SGD.

    python -m simulations.cuda_check [--device cuda|cpu] [--model PATH | --random-smollm2 [DIR]]
                                     [--out FILE.json] [--steps N] [--warmup W]
                                     [--variants nf4:bfloat16,none:bfloat16,none:float32]

For each variant (quantization:compute dtype) it loads the base through the client's own
loader, attaches the client's LoRA adapter (r=8 on q_proj,v_proj), and runs the client's
`train` twice on the same Poisson draws (batch 8 x seq 128 of random token ids): once
without DP and once with DP-SGD (Opacus: per-sample clipping and Gaussian noise), as a
client round does. It reports seconds per step (median of timed steps after warm-up, the
device synchronised at each step), peak device memory, the loss, how far the adapter
moved, and the DP overhead; prints a table and writes JSON.

`--random-smollm2 DIR` builds SmolLM2-135M's architecture from DIR/config.json (with
DIR's tokenizer) with random weights: what a device call can carry (64 MiB) holds the
configuration, not the 538 MB of weights. Speed and memory are then real; the loss
values mean nothing.

The client passes CPU random generators for both Poisson sampling and DP noise
(client/rounds.py). The first DP run here does the same; if the DP optimizer refuses a
CPU generator on this device, that is recorded and the remaining runs use a generator
on the device, so the figures still come.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import resource
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

DEFAULT_CONFIG_DIR = ".cuda_check/smollm2-135m"
RANDOM_NOTE = ("random-initialised weights with the architecture of {}/config.json "
               "(SmolLM2-135M's by default): speed and memory are real, the loss values "
               "mean nothing")


def project() -> SimpleNamespace:
    """Every name this script takes from the project: update here after a refactor."""
    from client.adapter import attach_lora, get_adapter
    from client.base_model import Quantization, load_base
    from client.data import Examples
    from client.dp_plan import DPPlan
    from client.trainer import train

    return SimpleNamespace(Examples=Examples, Quantization=Quantization,
                           attach_lora=attach_lora, get_adapter=get_adapter,
                           load_base=load_base, DPPlan=DPPlan, train=train)


def _versions() -> dict:
    import importlib.metadata as md

    import torch

    out = {"python": platform.python_version(), "torch": torch.__version__,
           "torch_cuda": torch.version.cuda}
    for name in ("transformers", "peft", "accelerate", "bitsandbytes", "opacus", "safetensors"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = None
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        out.update(gpu=torch.cuda.get_device_name(0), gpu_capability=f"{props.major}.{props.minor}",
                   gpu_memory_mib=props.total_memory >> 20, gpu_count=torch.cuda.device_count())
    return out


def build_random_model(config_dir: Path, target: Path, seed: int = 0) -> Path:
    """A model folder with `config_dir`'s architecture and tokenizer and random weights."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(config_dir)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(target)
    for f in config_dir.iterdir():  # tokenizer, generation config, chat template
        if f.is_file() and f.name != "config.json" and not (target / f.name).exists():
            shutil.copy2(f, target / f.name)
    del model
    return target


def random_examples(p, vocab: int, count: int, seq_len: int, seed: int):
    import torch

    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (count, seq_len), generator=gen)
    return p.Examples(ids, torch.ones_like(ids), ids.clone())


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _adapter_change(before: dict, after: dict) -> float:
    import numpy as np

    return float(math.sqrt(sum(float(np.sum((after[k] - before[k]) ** 2)) for k in before)))


def _batch_sizes(count: int, rate: float, steps: int, seed: int) -> list[int]:
    """The Poisson batch sizes `train` draws with a sampling generator seeded `seed`."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    return [int((torch.rand(count, generator=gen) < rate).sum()) for _ in range(steps)]


def _timed_train(p, model, data, device, args, dp, noise) -> dict:
    """One `train` call of warm-up + timed steps; per-step times from the progress callback
    (called after each step's backward, before its optimizer step: the time between two
    consecutive calls is one whole step)."""
    import numpy as np
    import torch

    total = args.warmup + args.steps + 1
    marks: list[tuple[int, float, float]] = []

    def progress(step: int, loss: float) -> None:
        _sync(device)
        marks.append((step, time.perf_counter(), loss))

    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    before = p.get_adapter(model)
    sampling = torch.Generator().manual_seed(args.seed)
    _sync(device)
    plan = p.DPPlan.for_data(num_examples=len(data), batch_size=args.batch, steps=total,
                             **(dp or {}))
    result = p.train(model, data, plan=plan, lr=args.lr, sampling=sampling, noise=noise,
                     progress=progress)
    _sync(device)
    after = p.get_adapter(model)
    intervals = [(s1, t1 - t0)
                 for (s0, t0, _), (s1, t1, _) in zip(marks, marks[1:], strict=False)
                 if s1 == s0 + 1 and s0 > args.warmup]
    sizes = _batch_sizes(len(data), result.sample_rate, total, args.seed)
    timed_sizes = [sizes[s - 1] for s, _ in intervals]
    losses = [loss for _, _, loss in marks]
    secs = [dt for _, dt in intervals]
    return {
        "dp": dp is not None,
        "steps": result.steps,
        "timed_steps": len(secs),
        "s_per_step": statistics.median(secs) if secs else math.nan,
        "s_per_step_all": [round(s, 5) for s in secs],
        "mean_timed_batch": statistics.mean(timed_sizes) if timed_sizes else math.nan,
        "timed_batch_sizes": timed_sizes,
        "train_seconds": result.seconds,
        "empty_steps": result.empty_steps,
        "mean_loss": result.mean_loss,
        "losses": [round(x, 4) for x in losses],
        "loss_finite": bool(losses) and all(math.isfinite(x) for x in losses),
        "adapter_change_norm": _adapter_change(before, after),
        "adapter_finite": all(bool(np.isfinite(v).all()) for v in after.values()),
        "peak_mib": (torch.cuda.max_memory_allocated(device) / 2**20
                     if device.type == "cuda" else None),
    }


def _count_modules(model, class_name: str) -> int:
    return sum(type(m).__name__ == class_name for m in model.modules())


def run_variant(p, source: str, variant: str, device, args, state: dict) -> list[dict]:
    import torch

    mode, dtype = variant.split(":")
    rows: list[dict] = []
    base = dict(variant=variant, quantization=mode, dtype=dtype)
    t0 = time.perf_counter()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    base_model, _tokenizer = p.load_base(source, p.Quantization(mode, dtype, "cuda_check"), device)
    model = p.attach_lora(base_model, args.lora_r, 2.0 * args.lora_r, 0.0, ["q_proj", "v_proj"],
                          args.seed)
    load_s = time.perf_counter() - t0
    data = random_examples(p, model.config.vocab_size, args.examples, args.seq, args.seed)
    data = data.to(device)
    trainable = sum(x.numel() for x in model.parameters() if x.requires_grad)
    base.update(
        load_seconds=load_s,
        linear4bit_modules=_count_modules(model, "Linear4bit"),
        linear8bit_modules=_count_modules(model, "Linear8bitLt"),
        trainable_params=trainable,
        weights_mib=(torch.cuda.memory_allocated(device) / 2**20
                     if device.type == "cuda" else None),
        load_peak_mib=(torch.cuda.max_memory_allocated(device) / 2**20
                       if device.type == "cuda" else None),
        lora_dtype=str(next(x for x in model.parameters() if x.requires_grad).dtype),
    )
    print(f"[{variant}] loaded in {load_s:.1f} s: {base['linear4bit_modules']} Linear4bit, "
          f"{trainable} trainable, weights {base['weights_mib']} MiB", flush=True)

    # an untimed warm-up call first, so that one-off costs (kernel loading, allocator
    # growth) fall on neither of the timed runs
    p.train(model, data, plan=p.DPPlan.for_data(num_examples=len(data), batch_size=args.batch,
                                                steps=2),
            lr=args.lr, sampling=torch.Generator().manual_seed(args.seed))
    rows.append({**base, **_timed_train(p, model, data, device, args, None, None)})
    print(f"[{variant}] plain: {rows[-1]['s_per_step']:.4f} s/step", flush=True)

    dp = {"noise_multiplier": args.noise_multiplier, "clip_norm": args.clip_norm}
    noise_kind = state.get("noise", "cpu")
    if noise_kind == "cpu":  # what the client passes (client/rounds.py)
        try:
            row = _timed_train(p, model, data, device, args, dp,
                               torch.Generator().manual_seed(args.seed + 1))
            state["noise"] = "cpu"
            state.setdefault("cpu_noise_generator", {"ok": True, "error": None})
        except RuntimeError as exc:
            msg = f"{type(exc).__name__}: {str(exc).splitlines()[0]}"
            print(f"[{variant}] DP with the client's CPU noise generator FAILED: {msg}",
                  flush=True)
            state["cpu_noise_generator"] = {"ok": False, "error": msg, "variant": variant}
            state["noise"] = noise_kind = "device"
    if state.get("noise") == "device":
        row = _timed_train(p, model, data, device, args, dp,
                           torch.Generator(device=device).manual_seed(args.seed + 1))
    row["noise_generator"] = state["noise"]
    rows.append({**base, **row})
    print(f"[{variant}] DP:    {rows[-1]['s_per_step']:.4f} s/step", flush=True)
    del model, base_model, data
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def _table(rows: list[dict]) -> str:
    head = ("| variant | DP | s/step | mean batch | peak MiB | weights MiB | mean loss | "
            "adapter Δ norm | Linear4bit |")
    lines = [head, "|" + "---|" * 9]
    for r in rows:
        fmt = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
        lines.append(
            f"| {r['variant']} | {'yes' if r['dp'] else 'no'} | {r['s_per_step']:.4f} | "
            f"{r['mean_timed_batch']:.1f} | {fmt(r['peak_mib'], '.0f')} | "
            f"{fmt(r['weights_mib'], '.0f')} | {r['mean_loss']:.3f} | "
            f"{r['adapter_change_norm']:.4g} | {r['linear4bit_modules']} |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m simulations.cuda_check", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="a model folder (config.json, weights, tokenizer)")
    src.add_argument("--random-smollm2", nargs="?", const=DEFAULT_CONFIG_DIR, metavar="DIR",
                     help="random weights, architecture and tokenizer from DIR "
                          f"(default {DEFAULT_CONFIG_DIR})")
    ap.add_argument("--out", help="write the results here as JSON")
    ap.add_argument("--steps", type=int, default=10, help="timed steps per run")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--variants", default=None,
                    help="comma list of quantization:dtype (default: nf4:bfloat16,"
                         "none:bfloat16,none:float32 on cuda; nf4:float32,none:float32 on cpu)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--examples", type=int, default=512)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--lora-r", type=int, default=8)
    ap.add_argument("--noise-multiplier", type=float, default=1.0)
    ap.add_argument("--clip-norm", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    import torch

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: CUDA is not available")
    variants = (args.variants.split(",") if args.variants else
                ["nf4:bfloat16", "none:bfloat16", "none:float32"] if device.type == "cuda"
                else ["nf4:float32", "none:float32"])
    p = project()
    report: dict = {"started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "argv": sys.argv[1:],
                    "device": str(device), "versions": _versions(),
                    "shape": {"batch": args.batch, "seq": args.seq, "examples": args.examples,
                              "warmup": args.warmup, "timed_steps": args.steps,
                              "lora_r": args.lora_r, "targets": ["q_proj", "v_proj"],
                              "noise_multiplier": args.noise_multiplier,
                              "clip_norm": args.clip_norm, "data": "random token ids"}}
    print(json.dumps(report["versions"]), flush=True)
    tmp = None
    try:
        if args.random_smollm2:
            tmp = Path(tempfile.mkdtemp(prefix="cuda_check-"))
            t0 = time.perf_counter()
            source = str(build_random_model(Path(args.random_smollm2), tmp / "model", args.seed))
            report["model"] = {"source": f"random weights, config {args.random_smollm2}",
                               "random_weights": True,
                               "note": RANDOM_NOTE.format(args.random_smollm2),
                               "build_seconds": time.perf_counter() - t0}
            print(f"NOTE: {report['model']['note']}", flush=True)
        else:
            source = args.model
            report["model"] = {"source": source, "random_weights": False}
        config = json.loads((Path(source) / "config.json").read_text())
        report["model"].update({k: config.get(k) for k in (
            "model_type", "hidden_size", "num_hidden_layers", "vocab_size",
            "intermediate_size", "num_attention_heads", "num_key_value_heads")})
        state: dict = {}
        rows: list[dict] = []
        for variant in variants:
            rows.extend(run_variant(p, source, variant, device, args, state))
        report["runs"] = rows
        report["cpu_noise_generator"] = state.get("cpu_noise_generator")
        report["dp_overhead"] = {}
        for v in variants:
            plain = next(r for r in rows if r["variant"] == v and not r["dp"])
            dp = next(r for r in rows if r["variant"] == v and r["dp"])
            report["dp_overhead"][v] = dp["s_per_step"] / plain["s_per_step"]
        report["checks"] = {
            "loss_finite": all(r["loss_finite"] for r in rows),
            "adapter_changed": all(r["adapter_change_norm"] > 0 for r in rows),
            "adapter_finite": all(r["adapter_finite"] for r in rows),
        }
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    report["max_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print()
    print(_table(report["runs"]))
    print("DP overhead (DP s/step / plain s/step): " + ", ".join(
        f"{v} {x:.2f}x" for v, x in report["dp_overhead"].items()))
    cng = report["cpu_noise_generator"]
    print("client's CPU noise generator under DP: " +
          ("ok" if cng and cng["ok"] else f"FAILED ({cng['error']})" if cng else "not run"))
    print("checks: " + json.dumps(report["checks"]))
    if report["model"].get("random_weights"):
        print(f"NOTE: {report['model']['note']}")
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2, default=str) + "\n")
    return report


if __name__ == "__main__":
    main()
