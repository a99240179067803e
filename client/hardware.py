"""What the CPU can do fast: its class (AMX / AVX512-BF16 / AVX-512 / AVX2 / NEON ...) and
whether bf16 matrix work is native.

bf16 is only worth it with native instructions (x86: avx512_bf16 or amx_bf16; Arm: bf16).
Without them PyTorch emulates it: measured 0.8 GFLOP/s per thread on an AVX2 EPYC against
26 for fp32. oneDNN's ISA cap (ONEDNN_MAX_CPU_ISA) counts too: capped below
AVX512_CORE_BF16, a bf16 CPU runs bf16 as slowly as one without it, which is how the
no-bf16 path is measured on a bf16 machine (EMULATE_NO_BF16; docs/speed.md).
"""

from __future__ import annotations

import os
import platform
from pathlib import Path

# oneDNN ISA names that still include native bf16 matrix instructions
BF16_ISAS = {"AVX512_CORE_BF16", "AVX512_CORE_FP16", "AVX10_1_512", "AVX512_CORE_AMX",
             "AVX10_1_512_AMX", "AVX512_CORE_AMX_FP16", "AVX10_1_512_AMX_FP16", "ALL",
             "DEFAULT"}
# The settings that make a bf16 x86 CPU run like an AVX2 one (no bf16, no AVX-512).
EMULATE_NO_BF16 = {"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}


def cpu_flags(cpuinfo: str | None = None) -> set[str]:
    """The CPU's feature flags (x86 `flags`, Arm `Features`) from /proc/cpuinfo."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return set(value.split())
    return set()


def cpu_class(flags: set[str] | None = None, machine: str | None = None) -> str:
    """A name for what the CPU offers to matrix work, best first."""
    flags = cpu_flags() if flags is None else flags
    machine = machine or platform.machine()
    if machine in ("aarch64", "arm64"):
        return "NEON+BF16" if "bf16" in flags else "NEON"
    for flag, name in (("amx_bf16", "AMX"), ("avx512_bf16", "AVX512-BF16"),
                       ("avx512f", "AVX-512"), ("avx2", "AVX2")):
        if flag in flags:
            return name
    return "other"


def onednn_cap() -> str:
    return os.environ.get("ONEDNN_MAX_CPU_ISA", "").upper()


FAST_BF16 = ("AMX", "AVX512-BF16")  # measured faster than fp32 here; Arm bf16 is not yet


def cpu_supports_bf16(flags: set[str] | None = None, machine: str | None = None) -> bool:
    """bf16 is the faster choice: native bf16 matrix instructions that were measured to
    beat fp32 (x86 AVX512-BF16 / AMX), not capped away by ONEDNN_MAX_CPU_ISA. Arm cores
    with bf16 keep fp32 until someone measures them."""
    native = cpu_class(flags, machine) in FAST_BF16
    cap = onednn_cap()
    return native and (not cap or cap in BF16_ISAS)


def describe() -> dict[str, str | bool]:
    """The CPU class, what runs (after any oneDNN/ATen cap) and whether bf16 is used."""
    import torch

    cap = onednn_cap()
    real = cpu_class()
    effective = real if not cap or cpu_supports_bf16() or real in ("AVX2", "NEON", "other") \
        else f"{cap.replace('_', '-')} (emulated on {real})"
    return {"cpu_class": real, "runs_as": effective, "bf16": cpu_supports_bf16(),
            "aten_capability": torch.backends.cpu.get_cpu_capability(),
            "onednn_max_cpu_isa": cap or "default"}
