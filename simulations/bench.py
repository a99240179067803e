"""`fedslm bench`: the client's speed and memory, the update's size, the federation's
overhead, measured side by side on this machine; prints a markdown report and writes it
to BENCHMARKS.md.

Each training case runs in a fresh process (simulations/bench_step.py), so that its
peak memory is its own. Step times are medians over `steps` timed steps after warm-up,
on fixed batches of `batch` sequences of `seq_len` tokens from the embedded data.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from client.settings import micro_batch
from simulations.time_to_quality import render as render_ttq


@dataclass
class BenchConfig:
    model: str = "embedded"
    data: str = "embedded"
    seq_len: int = 128
    batch: int = 8
    threads: int = 2
    lora_r: int = 8
    micro_batch_tokens: int | str = "auto"  # the client default (client/settings.py)
    steps: int = 6
    warmup: int = 1
    quick: bool = False  # structure only: one step per case, a tiny round
    cases: list[str] = field(default_factory=list)  # names to run (default: all)
    emulate_no_bf16: bool = False  # run as a CPU without bf16 (client/hardware.py)


# (name, quantization, dtype, dp, loss, micro-batch?, threads override)
CASES = [
    ("fp32 LoRA, HF loss (baseline)", "none", "float32", False, "hf", False, 0),
    ("fp32 LoRA, chunked loss", "none", "float32", False, "chunked", False, 0),
    ("fp32 DP-LoRA, chunked loss", "none", "float32", True, "chunked", False, 0),
    ("bf16 LoRA, full-logits loss", "none", "bfloat16", False, "full", False, 0),
    ("bf16 DP-LoRA, full-logits loss", "none", "bfloat16", True, "full", False, 0),
    ("bf16 LoRA, chunked loss", "none", "bfloat16", False, "chunked", False, 0),
    ("bf16 DP-LoRA, chunked loss", "none", "bfloat16", True, "chunked", False, 0),
    ("auto base, LoRA, chunked, micro-batch", "auto", "", False, "chunked", True, 0),
    ("auto base, DP-LoRA, chunked, micro-batch (client default)", "auto", "", True,
     "chunked", True, 0),
    ("bf16 DP-LoRA, chunked, micro-batch, 1 thread", "none", "bfloat16", True, "chunked",
     True, 1),
    ("int8 (bitsandbytes) LoRA, chunked, micro-batch", "int8", "bfloat16", False, "chunked",
     True, 0),
    ("int8 (bitsandbytes) DP-LoRA, chunked, micro-batch", "int8", "bfloat16", True, "chunked",
     True, 0),
    ("nf4 (bitsandbytes) LoRA, chunked, micro-batch", "nf4", "bfloat16", False, "chunked",
     True, 0),
    ("nf4 (bitsandbytes) DP-LoRA, chunked, micro-batch", "nf4", "bfloat16", True, "chunked",
     True, 0),
    ("nf4 (bitsandbytes) DP-LoRA, fp32 compute, chunked, micro-batch", "nf4", "float32", True,
     "chunked", True, 0),  # the memory lever where there is no bf16
]
BASELINE = CASES[0][0]
DEFAULT = CASES[8][0]
# (comparison, case a, case b): timed step by step in turn in one process
PAIRED = [("DP overhead, client default", CASES[7][0], CASES[8][0]),
          ("DP overhead, fp32", CASES[1][0], CASES[2][0]),
          ("speed-up, client default vs baseline", CASES[0][0], CASES[8][0]),
          ("NF4 base vs the client default (DP)", CASES[8][0], CASES[13][0])]
DP_PAIRS = [(CASES[1][0], CASES[2][0]), (CASES[3][0], CASES[4][0]), (CASES[5][0], CASES[6][0]),
            (CASES[7][0], CASES[8][0]), (CASES[10][0], CASES[11][0]),
            (CASES[12][0], CASES[13][0])]


def _case(cfg: BenchConfig, name: str, quant: str, dtype: str, dp: bool, loss: str,
          micro: bool, threads: int) -> dict[str, Any]:
    return {"name": name, "model": cfg.model, "data": cfg.data, "quantization": quant,
            "dtype": dtype, "dp": dp, "loss": loss, "seq_len": cfg.seq_len, "batch": cfg.batch,
            "micro_batch_tokens": cfg.micro_batch_tokens if micro else 0,
            "threads": threads or cfg.threads,
            "lora_r": cfg.lora_r, "warmup": cfg.warmup, "steps": cfg.steps, "flops": True}


def _run_cases(cases: list[dict[str, Any]], threads: int) -> list[dict[str, Any]]:
    """Run `cases` in one fresh process; a failure is reported for each case it left."""
    out = subprocess.run([sys.executable, "-m", "simulations.bench_step", json.dumps(cases)],
                         capture_output=True, text=True, env=_quiet_env(threads))
    done = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    last = (out.stderr.strip().splitlines() or ["no output"])[-1]
    return done + [{**c, "error": last} for c in cases[len(done):]]


def _quiet_env(threads: int) -> dict[str, str]:
    from contracts.environment import quiet_environ

    return {**quiet_environ(), "OMP_NUM_THREADS": str(threads), "PYTHONWARNINGS": "ignore"}


def matmul_peak(dtype_name: str, threads: int, n: int = 1536, seconds: float = 2.0) -> float:
    """Dense matmul FLOP/s this machine reaches with `threads` threads (the MFU denominator)."""
    import torch

    torch.set_num_threads(threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    n = n * 4 if device == "cuda" else n
    dtype = getattr(torch, dtype_name)
    a, b = (torch.randn(n, n, device=device).to(dtype) for _ in range(2))
    a @ b
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        count += 1
    if device == "cuda":
        torch.cuda.synchronize()
    return 2 * n**3 * count / (time.perf_counter() - start)


def update_sizes(cfg: BenchConfig) -> list[dict[str, Any]]:
    """Bytes a client sends per round, per strategy and encoding, from real encoded updates
    of the model's adapter (sizes do not depend on the values)."""
    import numpy as np
    import torch

    from client import adapter as adapter_mod
    from client import base_model as model_mod
    from contracts import codec
    from contracts.transport import payload_bytes, to_record

    source = model_mod.prepare_base(cfg.model)
    base, _ = model_mod.load_base(source, model_mod.Quantization("none", "float32", "bench"),
                                  torch.device("cpu"))
    full = {name: sum(p.numel() for p in base.parameters()) * size
            for name, size in (("bf16", 2), ("fp32", 4))}
    rows = []
    for strategy, rank in (("fedavg", cfg.lora_r), ("ffa-lora", cfg.lora_r), ("hetlora", 2)):
        model = adapter_mod.attach_lora(base, rank, 2.0 * rank, 0.0, ["q_proj", "v_proj"], 0)
        adapter = adapter_mod.get_adapter(model)
        base = model.unload()
        if strategy == "ffa-lora":
            adapter = {k: v for k, v in adapter.items() if ".lora_A." not in k}
        trained = {k: v + np.float32(1e-3) for k, v in adapter.items()}
        for encoding in codec.ENCODINGS:
            record = codec.pack(*codec.encode(trained, adapter, encoding))
            sent = payload_bytes(to_record(record))
            rows.append({"strategy": strategy + (f" (rank {rank})" if strategy == "hetlora"
                                                 else ""), "encoding": encoding, "bytes": sent,
                         "values": sum(v.size for v in adapter.values()),
                         "ratio_bf16": full["bf16"] / sent, "ratio_fp32": full["fp32"] / sent})
    return rows


def federation_overhead(cfg: BenchConfig, workdir: Path) -> dict[str, Any]:
    """A simulated federation (2 clients, one at a time with all threads, 3 rounds): each
    round's wall time against the sum of its clients' training and evaluation time."""
    from contracts.rundir import read_metrics
    from simulations.engine import simulate

    overrides = {"model": cfg.model, "data": cfg.data, "num-clients": 2,
                 "num-server-rounds": 1 if cfg.quick else 3, "local-steps": 1 if cfg.quick else 6,
                 "seq-len": cfg.seq_len, "batch-size": cfg.batch,
                 "micro-batch-tokens": cfg.micro_batch_tokens,
                 "client-cpus": cfg.threads, "max-eval-seqs": 8, "out": str(workdir)}
    run_dir = simulate(overrides, echo=lambda line: None)
    rounds = []
    for line in read_metrics(run_dir):
        compute = sum((c["train_seconds"] or 0.0) + (c["eval_seconds"] or 0.0)
                      for c in line["clients"])
        rounds.append({"round": line["round"], "wall_s": line["round_seconds"],
                       "compute_s": compute, "overhead": 1 - compute / line["round_seconds"]})
    return {"config": overrides, "rounds": rounds}


def _runnable(cfg: BenchConfig) -> list[tuple]:
    """The cases to run: those asked for; on the emulated no-bf16 path not the bf16 ones
    (emulated bf16 runs ~100x slower than fp32: no client picks it there)."""
    return [c for c in CASES if (not cfg.cases or c[0] in cfg.cases)
            and not (cfg.emulate_no_bf16 and c[2] == "bfloat16")]


def run_bench(cfg: BenchConfig, echo: Callable[[str], None] = print) -> dict[str, Any]:
    if cfg.emulate_no_bf16:  # before this process or a case's first matmul
        from client.hardware import EMULATE_NO_BF16

        os.environ.update(EMULATE_NO_BF16)
    if cfg.quick:
        cfg.steps, cfg.warmup = 1, 0
    runnable = _runnable(cfg)
    chosen = [_case(cfg, *c) for c in runnable]
    by_name = {c[0]: c for c in CASES}
    kept = {c[0] for c in _runnable(BenchConfig(emulate_no_bf16=cfg.emulate_no_bf16))}
    paired = [{"name": name, "a": _case(cfg, *by_name[a]), "b": _case(cfg, *by_name[b])}
              for name, a, b in PAIRED if {a, b} <= kept]
    if cfg.quick:  # one process for all: peak memory is not measured apart
        results = _run_cases(chosen + paired, cfg.threads)
    else:
        results = []
        for case in chosen + paired:
            echo(f"bench: {case['name']} ...")
            results += _run_cases([case], cfg.threads)
    results, paired_results = ([r for r in results if "a" not in r],
                               [r for r in results if "a" in r])
    peaks = {d: matmul_peak(d, cfg.threads, n=256 if cfg.quick else 1536,
                            seconds=0.2 if cfg.quick else 2.0) for d in ("float32", "bfloat16")}
    echo("bench: update sizes ...")
    sizes = update_sizes(cfg)
    echo("bench: federation overhead (a simulated run) ...")
    with tempfile.TemporaryDirectory() as tmp:
        overhead = federation_overhead(cfg, Path(tmp))
    echo("bench: time to quality (textbook vs fedslm, side by side) ...")
    ttq = time_to_quality(cfg)
    return {"config": cfg.__dict__, "machine": machine(cfg.model), "steps": results,
            "paired": paired_results, "peaks": peaks,
            "sizes": sizes, "overhead": overhead, "time_to_quality": ttq}


def time_to_quality(cfg: BenchConfig) -> dict[str, Any]:
    """simulations/time_to_quality.py in a fresh process (its three models' memory is its own)."""
    code = ("import json, sys; from simulations.time_to_quality import measure; "
            f"r = measure({cfg.model!r}, {cfg.data!r}, threads={cfg.threads}, "
            f"quick={cfg.quick}, echo=lambda line: print(line, file=sys.stderr)); "
            "print(json.dumps(r))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=_quiet_env(cfg.threads))
    if out.returncode != 0:
        return {"error": (out.stderr.strip().splitlines() or ["no output"])[-1]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def auto_path(model: str) -> str:
    """What `quantization=auto` resolves to here, as a client resolves it."""
    from client import base_model

    device = base_model.pick_device("auto")
    source = base_model.prepare_base(model)
    quant = base_model.choose_quantization("auto", device, base_model.count_params(source))
    return f"{quant.mode} base, {quant.dtype} compute on {device.type} ({quant.reason})"


def machine(model: str = "embedded") -> dict[str, Any]:
    import torch

    from client.hardware import describe

    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    return {"cpu": cpu or platform.processor(), "cores": os.cpu_count(), "memory_gib": mem,
            "gpu": gpu, "python": platform.python_version(), "torch": torch.__version__,
            **describe(), "auto": auto_path(model)}


TARGETS = {"dp_overhead": 1.10, "peak_mb": 1536, "speedup": 2.0, "compression": 500,
           "federation_overhead": 0.15, "time_to_quality": 2.0}


def _by_name(result: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {r["name"]: r for r in result["steps"] if "error" not in r}


def headline(result: dict[str, Any]) -> dict[str, float | None]:
    """The figures the targets are about (None where a case did not run)."""
    steps = _by_name(result)
    default = steps.get(DEFAULT)
    pairs = {r["name"]: r for r in result["paired"] if "error" not in r}
    paired, speed = pairs.get(PAIRED[0][0]), pairs.get(PAIRED[2][0])
    fedavg = next((s for s in result["sizes"]
                   if s["strategy"] == "fedavg" and s["encoding"] == "int8-delta"), None)
    later = [r["overhead"] for r in result["overhead"]["rounds"] if r["round"] >= 1] or \
        [r["overhead"] for r in result["overhead"]["rounds"]]
    ttq = result.get("time_to_quality", {})
    return {
        "time_to_quality": ttq.get("speedup") or ttq.get("speedup_at_least"),
        "dp_overhead": paired["ratio"] if paired else None,
        "peak_mb": default["peak_train_mb"] if default else None,
        "process_peak_mb": default["peak_process_mb"] if default else None,
        "speedup": 1 / speed["ratio"] if speed else None,
        "compression": fedavg["ratio_bf16"] if fedavg else None,
        "federation_overhead": sum(later) / len(later) if later else None,
    }


def render(result: dict[str, Any], command: str) -> str:
    cfg, m = result["config"], result["machine"]
    micro = ", ".join(f"{micro_batch(cfg['micro_batch_tokens'], cfg['seq_len'], d)} with "
                      f"{d}" for d in ("bfloat16", "float32"))
    out = ["# Benchmarks", "",
           f"Measured with `{command}` on {time.strftime('%Y-%m-%d')}: {m['cpu']}, "
           f"{m['cores']} cores, {m['memory_gib']:.0f} GiB, GPU {m['gpu']}; Python "
           f"{m['python']}, torch {m['torch']}. Model `{cfg['model']}` (SmolLM2-135M unless "
           f"set), LoRA r={cfg['lora_r']} on q_proj,v_proj, batch {cfg['batch']} x "
           f"{cfg['seq_len']} tokens, {cfg['threads']} threads, micro-batches "
           f"(`micro-batch-tokens` {cfg['micro_batch_tokens']}: sequences {micro}) where the "
           "case says so; median of "
           f"{cfg['steps']} steps after warm-up, each case in a fresh process. "
           f"CPU class **{m['cpu_class']}**, run as **{m['runs_as']}** (ATen "
           f"{m['aten_capability']}, oneDNN cap {m['onednn_max_cpu_isa']}); `auto` picked "
           f"{m['auto']}."
           + (" Emulated no-bf16 path (`--emulate-no-bf16`): bf16 cases not run."
              if cfg.get("emulate_no_bf16") else "")
           + (" **Quick mode: one step, numbers meaningless.**" if cfg["quick"] else ""),
           "", LEVERS, ""]
    out += _targets_table(result) + [""] + _steps_table(result) + [""] + _dp_table(result)
    out += [""] + _sizes_table(result) + [""] + _overhead_table(result)
    ttq = result.get("time_to_quality", {})
    out += [""] + (render_ttq(ttq) if "curves" in ttq else
                   ["## Time to quality (DP, same ε)", "", f"failed: {ttq.get('error')}"])
    return "\n".join(out) + "\n"


LEVERS = """What the cases vary:
- **loss**: `hf` is what `model(..., labels=...)` computes (full fp32 logits, then
  cross-entropy); `full-logits` is fedslm's per-sequence loss over full logits; `chunked`
  applies the frozen LM head a few hundred positions at a time and takes the gradient in
  the same pass (client/loss.py), so no [batch, seq, vocab] tensor is kept.
- **dtype / quantization**: the frozen base in fp32, bf16, or bitsandbytes int8 / NF4
  (bf16 compute); the LoRA weights stay fp32.
- **micro-batch**: a drawn batch goes through forward/backward a few sequences at a time;
  under DP Opacus clips and sums each part and adds the noise once (the same update and
  privacy, less activation memory).
- **threads**: torch threads of the training process.

Separate processes on a shared machine drift: compare ratios from the paired table where
one is given."""


def _ok(value: float | None, target: float, lower: bool) -> str:
    if value is None:
        return "not measured"
    return "met" if (value <= target if lower else value >= target) else "**not met**"


def _targets_table(result: dict[str, Any]) -> list[str]:
    h, t = headline(result), TARGETS
    fmt = (lambda v, f: "n/a" if v is None else f.format(v))  # noqa: E731
    return [
        "## Targets (default client configuration)", "",
        "| target | measured | |", "|---|---|---|",
        f"| DP overhead <= {t['dp_overhead']:.2f}x plain LoRA (paired) | "
        f"{fmt(h['dp_overhead'], '{:.2f}x')} | {_ok(h['dp_overhead'], t['dp_overhead'], True)} |",
        f"| client peak memory while training <= {t['peak_mb'] / 1024:.1f} GiB | "
        f"{fmt(h['peak_mb'], '{:.0f} MiB')} (whole process, loading included: "
        f"{fmt(h['process_peak_mb'], '{:.0f} MiB')}) | {_ok(h['peak_mb'], t['peak_mb'], True)} |",
        f"| samples/s >= {t['speedup']:.0f}x fp32 LoRA with HF's loss (paired) | "
        f"{fmt(h['speedup'], '{:.2f}x')} | {_ok(h['speedup'], t['speedup'], False)} |",
        f"| bytes per client and round >= {t['compression']}x smaller than the model (bf16) | "
        f"{fmt(h['compression'], '{:.0f}x')} | "
        f"{_ok(h['compression'], t['compression'], False)} |",
        f"| federation overhead <= {t['federation_overhead']:.0%} of a round (simulation) | "
        f"{fmt(h['federation_overhead'], '{:.1%}')} | "
        f"{_ok(h['federation_overhead'], t['federation_overhead'], True)} |",
        f"| time to quality >= {t['time_to_quality']:.0f}x the textbook DP path (same ε) | "
        f"{fmt(h['time_to_quality'], '{:.2f}x')} | "
        f"{_ok(h['time_to_quality'], t['time_to_quality'], False)} |",
    ]


def _steps_table(result: dict[str, Any]) -> list[str]:
    base = _by_name(result).get(BASELINE)
    rows = ["## Training step", "",
            "| case | base | s/step | samples/s | vs baseline | CPU s/step | peak RSS training "
            "(MiB) | peak RSS process (MiB) | GFLOP/step | MFU |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    # torch's counter misses bitsandbytes' 4-bit matmuls: a quantized base does the same
    # model FLOPs as the float one, so MFU uses the most any case counted
    counted = [r["flops_per_step"] for r in result["steps"] if "error" not in r]
    exact = [r["flops_per_step"] for r in result["steps"]
             if "error" not in r and r["quantization"] == "none"]
    model_flops = max(exact or counted or [0])
    for r in result["steps"]:
        if "error" in r:
            rows.append(f"| {r['name']} | | failed: {r['error'][:120]} | | | | | | | |")
            continue
        peak = result["peaks"]["float32" if r["dtype"] == "float32" else "bfloat16"]
        peak *= r["threads"] / result["config"]["threads"]
        mfu = model_flops / r["step_s"] / peak
        speed = r["samples_per_s"] / base["samples_per_s"] if base else float("nan")
        gpu = f" (GPU {r['gpu_peak_mb']:.0f})" if r.get("gpu_peak_mb") else ""
        base_kind = r["dtype"] if r["quantization"] == "none" else f"{r['quantization']}"
        rows.append(f"| {r['name']} | {base_kind} | {r['step_s']:.2f} | "
                    f"{r['samples_per_s']:.2f} | {speed:.2f}x | {r['cpu_s_per_step']:.2f} | "
                    f"{r['peak_train_mb']:.0f}{gpu} | {r['peak_process_mb']:.0f} | "
                    f"{r['flops_per_step'] / 1e9:.0f} | {mfu:.0%} |")
    p = result["peaks"]
    rows += ["", f"MFU: FLOPs counted by `torch.utils.flop_counter` on one step, over the "
             f"dense-matmul rate measured here with the same threads (fp32 "
             f"{p['float32'] / 1e9:.0f} GFLOP/s, bf16 {p['bfloat16'] / 1e9:.0f} GFLOP/s; "
             "a case with fewer threads against that rate scaled by its share). GFLOP/step "
             "is what the counter saw; it misses bitsandbytes' 4-bit matmuls, so MFU divides "
             f"the float model's {model_flops / 1e9:.0f} GFLOP per step for every case. "
             "Peak RSS training: the process's peak after the model was loaded (VmHWM "
             "reset); process: its whole life, loading included."]
    return rows


def _dp_table(result: dict[str, Any]) -> list[str]:
    steps = _by_name(result)
    rows = ["## DP overhead (Opacus per-sample gradients, clipping, noise)", "",
            "Two cases timed step by step in turn in one process, each on its own model (the "
            "targets' figures; a DP step attaches Opacus before and detaches after, untimed):",
            "", "| comparison | a | b | a s/step | b s/step | b / a time | a / b time |",
            "|---|---|---|---|---|---|---|"]
    for r in result["paired"]:
        if "error" in r:
            rows.append(f"| {r['name']} | | | failed: {r['error'][:120]} | | | |")
        else:
            rows.append(f"| {r['name']} | {r['a']['name']} | {r['b']['name']} | "
                        f"{r['a_s']:.2f} | {r['b_s']:.2f} | {r['ratio']:.2f}x | "
                        f"{1 / r['ratio']:.2f}x |")
    rows += ["", "The same pairs from the separate processes of the table above (these carry "
             "the drift between processes too):", "",
             "| pair | plain s/step | DP s/step | DP / plain | plain peak MiB | DP peak MiB |",
             "|---|---|---|---|---|---|"]
    for plain, private in DP_PAIRS:
        if plain in steps and private in steps:
            a, b = steps[plain], steps[private]
            rows.append(f"| {private} | {a['step_s']:.2f} | {b['step_s']:.2f} | "
                        f"{b['step_s'] / a['step_s']:.2f}x | {a['peak_train_mb']:.0f} | "
                        f"{b['peak_train_mb']:.0f} |")
    return rows


def _sizes_table(result: dict[str, Any]) -> list[str]:
    rows = ["## Bytes a client sends per round", "",
            "| strategy | encoding | adapter values | bytes | x smaller than the model in bf16 "
            "| in fp32 |", "|---|---|---|---|---|---|"]
    for s in result["sizes"]:
        rows.append(f"| {s['strategy']} | {s['encoding']} | {s['values']:,} | {s['bytes']:,} | "
                    f"{s['ratio_bf16']:.0f}x | {s['ratio_fp32']:.0f}x |")
    rows += ["", "Payload bytes of the reply's ArrayRecord as the server counts them; "
             "int8-delta adds one float32 scale per 128 values."]
    return rows


def _overhead_table(result: dict[str, Any]) -> list[str]:
    o = result["overhead"]
    c = o["config"]
    rows = ["## Federation overhead (simulation)", "",
            f"`fedslm simulate` with {c['num-clients']} clients run one at a time "
            f"(client-cpus {c['client-cpus']}), {c['local-steps']} local steps, DP on; round 0 "
            "only evaluates, and carries the start-up (Ray, the workers, loading the model and "
            "data). Overhead = 1 - (sum of the clients' training and evaluation seconds) / "
            "round wall time; the target's figure is the mean over the training rounds.", "",
            "| round | wall s | clients' compute s | overhead |", "|---|---|---|---|"]
    for r in o["rounds"]:
        rows.append(f"| {r['round']} | {r['wall_s']:.1f} | {r['compute_s']:.1f} | "
                    f"{r['overhead']:.1%} |")
    return rows


def report_path(m: dict[str, Any]) -> Path:
    """benchmarks/<class>.md: the class the run behaved as (`avx2-emulated` for the
    no-bf16 path on a bf16 CPU), so that each CPU class keeps its own report."""
    slug = m["cpu_class"].lower()
    if m["runs_as"] != m["cpu_class"]:
        slug = f"{m['onednn_max_cpu_isa'].lower().replace('_', '-')}-emulated-on-{slug}"
    return Path("benchmarks") / f"{slug}.md"


def main(cfg: BenchConfig, out: Path | str | None, json_out: Path | None,
         command: str) -> int:
    """`out`: a path, "by-class" (benchmarks/<class>.md) or None (print only)."""
    result = run_bench(cfg)
    text = render(result, command)
    print(text)
    if out == "by-class":
        out = report_path(result["machine"])
        out.parent.mkdir(exist_ok=True)
    if out:
        Path(out).write_text(text)
        print(f"bench: wrote {out}", file=sys.stderr)
    if json_out:
        json_out.write_text(json.dumps(result, indent=1))
    failed = [r["name"] for r in result["steps"] if "error" in r]
    return 1 if failed else 0
