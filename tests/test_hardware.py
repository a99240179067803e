"""The CPU class and the bf16 decision, and the emulated no-bf16 path (client/hardware.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from client import hardware

ZEN4 = "flags\t\t: fpu sse2 avx avx2 fma avx512f avx512bw avx512_bf16 avx512_vnni\n"
ZEN1 = "flags\t\t: fpu sse2 avx avx2 fma\n"
SAPPHIRE = "flags\t\t: avx2 avx512f avx512_bf16 amx_bf16 amx_tile\n"
PI5 = "Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp\n"


@pytest.mark.parametrize("cpuinfo, machine, name, bf16", [
    (ZEN4, "x86_64", "AVX512-BF16", True),
    (ZEN1, "x86_64", "AVX2", False),
    (SAPPHIRE, "x86_64", "AMX", True),
    ("flags\t\t: avx2 avx512f\n", "x86_64", "AVX-512", False),
    (PI5, "aarch64", "NEON", False),
    (PI5.rstrip() + " bf16 i8mm\n", "aarch64", "NEON+BF16", False),  # not measured yet
])
def test_cpu_class_and_bf16(cpuinfo, machine, name, bf16, monkeypatch):
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    flags = hardware.cpu_flags(cpuinfo)
    assert hardware.cpu_class(flags, machine) == name
    assert hardware.cpu_supports_bf16(flags, machine) is bf16


def test_a_onednn_cap_below_bf16_turns_bf16_off(monkeypatch):
    flags = hardware.cpu_flags(ZEN4)
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    assert not hardware.cpu_supports_bf16(flags, "x86_64")
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "avx512_core_bf16")
    assert hardware.cpu_supports_bf16(flags, "x86_64")


PROBE = """
import json, torch
from client import base_model, hardware
print(json.dumps({**hardware.describe(),
                  "dtype": str(base_model.compute_dtype(torch.device("cpu")))}))
"""


def test_the_emulated_path_runs_as_avx2_and_picks_fp32():
    env = {**os.environ, **hardware.EMULATE_NO_BF16}
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True,
                         env=env, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    seen = json.loads(out.stdout.strip().splitlines()[-1])
    assert seen["aten_capability"] == "AVX2"
    assert seen["bf16"] is False and seen["dtype"] == "torch.float32"
    assert seen["onednn_max_cpu_isa"] == "AVX2"
