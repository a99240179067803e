"""Progress inside a round: the client's file and log, the engine's lines and estimate."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from client.progress import RoundProgress
from contracts.rundir import read_progress
from server.progress import estimate_left, progress_line


def test_the_client_writes_its_progress_and_logs_it(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="fedslm.progress")
    shown = RoundProgress(state_dir=tmp_path / "client-0", run_id="r", client="client-0",
                          round=2, planned=3, every=0.0)
    assert read_progress(tmp_path) == [{"run-id": "r", "client": "client-0", "round": 2,
                                        "step": 0, "planned": 3, "elapsed": 0.0}]
    for step in (1, 2, 3):
        shown.step(step)
    (record,) = read_progress(tmp_path)
    assert record["step"] == 3 and record["elapsed"] >= 0
    assert [m for m in caplog.messages if "step" in m][-1].startswith(
        "client client-0 round 2: step 3/3")


def test_the_estimate_and_the_line():
    running = [{"client": "a", "step": 2, "planned": 10, "elapsed": 20.0},
               {"client": "b", "step": 5, "planned": 10, "elapsed": 25.0}]
    # a: 8 steps at 10 s = 80 s left; one waiting client after them: mean whole time
    # (100 + 50) / 2 = 75 s
    assert estimate_left(running, waiting=0) == pytest.approx(80.0)
    assert estimate_left(running, waiting=1) == pytest.approx(155.0)
    assert estimate_left([{"client": "a", "step": 0, "planned": 10, "elapsed": 3.0}], 0) is None
    # two clients done, the third started but without a step yet (the demo's third
    # client on 2 cores): its 6 steps at the others' 10 s, less its 4 s so far; not 0
    done = [{"client": c, "step": 6, "planned": 6, "elapsed": 60.0} for c in "ab"]
    third = {"client": "c", "step": 0, "planned": 6, "elapsed": 4.0}
    assert estimate_left([*done, third], waiting=0) == pytest.approx(56.0)
    line = progress_line(1, 31.4, running, sent=3)
    assert line == "  round 1 training, 31s: a 2/10, b 5/10, 1 waiting; about 155s left"
    assert progress_line(1, 5, [], sent=2) == \
        "  round 1 training, 5s: waiting for 2 clients (none has reported progress here; " \
        "a device logs its own)"


@pytest.mark.slow
def test_progress_lines_appear_during_a_simulated_round(tiny_model, text_clients, tmp_path):
    env = {**os.environ, "FEDSLM_CACHE_DIR": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1"}
    out = subprocess.run(
        [sys.executable, "-m", "fedslm.cli", "simulate", "--clients", "2", "--rounds", "1",
         "--local-steps", "150", "--out", str(tmp_path / "runs"), "--set",
         f"model={tiny_model}", "--set", f"data={text_clients}", "--set", "seq-len=32",
         "--set", "batch-size=4", "--set", "progress-seconds=0.5"],
        capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("  round 1 training")]
    assert lines, out.stdout
    assert any("/150" in ln for ln in lines), lines
    assert any("s left" in ln for ln in lines), lines
    run_dir = Path(out.stdout.strip().splitlines()[-1])
    done = {r["client"]: r for r in read_progress(run_dir / "clients")}
    assert {r["step"] for r in done.values()} == {150}
    assert json.loads((run_dir / "config.json").read_text())["progress-seconds"] == 0.5
