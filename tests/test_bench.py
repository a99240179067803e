"""`fedslm bench --quick`: every case runs and the report has its parts (no timings checked)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from simulations.bench import CASES, TARGETS

pytestmark = pytest.mark.slow


def test_quick_bench_runs_every_case_and_writes_the_report(tiny_model, text_clients, tmp_path):
    out, raw = tmp_path / "BENCH.md", tmp_path / "bench.json"
    env = {**os.environ, "FEDSLM_CACHE_DIR": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-m", "fedslm.cli", "bench", "--quick", "--model",
                           str(tiny_model), "--data", str(text_clients), "--out", str(out),
                           "--json", str(raw)],
                          capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:] + done.stdout[-3000:]
    result = json.loads(raw.read_text())
    assert [r["name"] for r in result["steps"]] == [c[0] for c in CASES]
    for r in result["steps"]:
        assert "error" not in r, r
        assert r["step_s"] > 0 and r["flops_per_step"] > 0 and r["peak_train_mb"] > 0
        assert r["trainable"] > 0
    assert len(result["paired"]) == 4
    assert all("error" not in r and r["a_s"] > 0 and r["b_s"] > 0 for r in result["paired"])
    assert {s["encoding"] for s in result["sizes"]} == {"float32", "int8-delta"}
    fedavg = {s["encoding"]: s["bytes"] for s in result["sizes"] if s["strategy"] == "fedavg"}
    assert fedavg["int8-delta"] < fedavg["float32"]  # the tiny model's record headers weigh
    rounds = result["overhead"]["rounds"]
    assert [r["round"] for r in rounds] == [0, 1]
    assert all(0 < r["compute_s"] < r["wall_s"] for r in rounds)
    ttq = result["time_to_quality"]
    # textbook, textbook in micro-batches, fedslm: start, after 1 and 2 steps
    assert [len(c["points"]) for c in ttq["curves"]] == [3, 3, 3]
    assert ttq["ours_s"] is not None and ttq["ours_s"] > 0  # the bar is its own final ppl
    assert ttq["curves"][0]["targets"] == ttq["curves"][1]["targets"] == "q_proj,v_proj"
    assert ttq["curves"][0]["per_forward"] == 0  # the whole draw
    assert ttq["curves"][1]["per_forward"] >= 1 and ttq["curves"][2]["per_forward"] >= 1
    text = out.read_text()
    for heading in ("## Targets", "## Training step", "## DP overhead", "## Bytes a client",
                    "## Federation overhead", "## Time to quality", "Quick mode"):
        assert heading in text
    assert text.count("| met |") + text.count("**not met**") == len(TARGETS)
    assert "fedslm bench --quick" in text


def test_quick_bench_on_the_emulated_no_bf16_path(tiny_model, text_clients, tmp_path):
    out, raw = tmp_path / "BENCH.md", tmp_path / "bench.json"
    env = {**os.environ, "FEDSLM_CACHE_DIR": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-m", "fedslm.cli", "bench", "--quick",
                           "--emulate-no-bf16", "--model", str(tiny_model), "--data",
                           str(text_clients), "--out", str(out), "--json", str(raw)],
                          capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:] + done.stdout[-3000:]
    result = json.loads(raw.read_text())
    names = [r["name"] for r in result["steps"]]
    assert names == [c[0] for c in CASES if c[2] != "bfloat16"]
    assert all("error" not in r for r in result["steps"])
    machine = result["machine"]
    assert machine["bf16"] is False and machine["onednn_max_cpu_isa"] == "AVX2"
    assert machine["auto"].startswith("none base, float32 compute on cpu")
    assert "Emulated no-bf16 path" in out.read_text()
