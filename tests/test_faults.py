"""Faults the server must survive: malformed or poisoned updates, too few replies, and a
ServerApp stopped after a round and resumed from its checkpoint."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from contracts.rundir import load_checkpoint, read_metrics, run_dirs, save_checkpoint
from server.app import FederationError
from server.replies import Reply
from server.validation import accept_updates, problems_with

GLOBAL = {"a.lora_A.weight": np.zeros((2, 4), np.float32),
          "a.lora_B.weight": np.zeros((4, 2), np.float32)}


def _update(**changes: np.ndarray) -> dict[str, np.ndarray]:
    update = {k: v + 0.1 for k, v in GLOBAL.items()}
    update.update({k.replace("__", "."): v for k, v in changes.items()})
    return update


@pytest.mark.parametrize("update, reason", [
    ({**_update(), "evil.weight": np.zeros(3, np.float32)}, "unexpected tensor names"),
    ({"a.lora_A.weight": GLOBAL["a.lora_A.weight"]}, "unexpected tensor names"),
    (_update(a__lora_A__weight=np.zeros((4, 2), np.float32)), "has shape (4, 2)"),
    (_update(a__lora_A__weight=np.zeros((2, 4), np.float64)), "has dtype float64"),
    (_update(a__lora_A__weight=np.zeros((2, 4), np.int32)), "has dtype int32"),
    (_update(a__lora_B__weight=np.full((4, 2), np.nan, np.float32)), "NaN or Inf"),
    (_update(a__lora_B__weight=np.full((4, 2), np.inf, np.float32)), "NaN or Inf"),
    (_update(a__lora_B__weight=np.full((4, 2), 100.0, np.float32)), "exceeds max-update-norm"),
])
def test_malformed_and_poisoned_updates_are_named(update, reason):
    assert reason in problems_with(update, GLOBAL, max_norm=10.0)


def test_a_valid_update_passes_and_the_norm_is_of_the_difference():
    assert problems_with(_update(), GLOBAL, max_norm=10.0) is None
    far = {k: v + 100.0 for k, v in GLOBAL.items()}
    assert problems_with(_update(), far, max_norm=0.0) is None  # 0: no bound
    norm = np.sqrt(16 * 0.1 ** 2)
    assert problems_with(_update(), GLOBAL, max_norm=norm * 0.99) is not None
    assert problems_with(_update(), GLOBAL, max_norm=norm * 1.01) is None


def test_rejected_updates_leave_the_round_to_the_valid_ones(caplog):
    good = Reply(node=11, client="good", metrics={}, info={}, arrays=_update())
    bad = Reply(node=12, client="bad", metrics={}, info={},
                arrays=_update(a__lora_B__weight=np.full((4, 2), np.nan, np.float32)))
    failures: list = []
    assert accept_updates([good, bad], failures, lambda u: GLOBAL, rnd=3) == [good]
    assert failures == [{"node": 12, "client": "bad", "reason": "a.lora_B.weight holds NaN or Inf"}]
    assert "rejected update from node 12 (bad)" in caplog.text
    with pytest.raises(FederationError, match="1 usable updates, fewer than min-replies=2"):
        accept_updates([good, bad], [], lambda u: GLOBAL, rnd=3, min_replies=2)


def test_checkpoint_round_trip_cuts_metrics_back(tmp_path):
    lines = [{"round": r, "eval_loss": 1.0 / (r + 1)} for r in range(3)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    save_checkpoint(tmp_path, {"round": 0, "x": 1}, GLOBAL)
    save_checkpoint(tmp_path, {"round": 1, "x": 2}, _update())
    state, arrays = load_checkpoint(tmp_path)
    assert state["round"] == 1 and state["x"] == 2
    assert all(np.array_equal(arrays[k], v) for k, v in _update().items())
    assert [x["round"] for x in read_metrics(tmp_path)] == [0, 1]  # round 2 is redone
    assert sorted(p.name for p in (tmp_path / "checkpoint").iterdir()) == \
        ["round-1.safetensors", "state.json"]


SIMULATE = """
import json, sys
from contracts.environment import apply_loopback
apply_loopback()
from simulations.engine import simulate

mode, config = sys.argv[1], json.loads(sys.argv[2])
client_app = None

class Stopped(Exception):
    pass

def echo(line):
    print(line, flush=True)
    if mode == "stop-after-1" and line.startswith("round 1/"):
        raise Stopped("ServerApp stopped after round 1")

if mode == "poison":
    import numpy as np
    from flwr.clientapp import ClientApp
    from client.app import evaluate, train
    from contracts.transport import from_record, to_record

    client_app = ClientApp()

    @client_app.train()
    def poisoned(msg, context):
        reply = train(msg, context)
        part = int(context.node_config["partition-id"])
        arrays = from_record(reply.content["arrays"])
        # int8-delta updates (the default) carry float scales: poison those
        floats = [k for k in sorted(arrays) if k.endswith("#scale")] or sorted(arrays)
        if part == 1:
            arrays[floats[0]] = np.full_like(arrays[floats[0]], np.nan)
        if part == 2:
            arrays = {k: v * 1e4 if k in floats else v for k, v in arrays.items()}
        reply.content["arrays"] = to_record(arrays)
        return reply

    client_app.evaluate()(evaluate)

try:
    simulate(config, echo=echo, client_app=client_app)
except Exception as exc:
    print(f"stopped: {exc!r}", flush=True)
"""


def _simulate(mode: str, config: dict, cache: Path) -> str:
    env = {**os.environ, "FEDSLM_CACHE_DIR": str(cache), "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", SIMULATE, mode, json.dumps(config)],
                         capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


@pytest.mark.slow
def test_poisoned_updates_are_rejected_in_a_real_round(tiny_model, text_clients, tmp_path):
    config = {"model": str(tiny_model), "data": str(text_clients), "num-clients": 3,
              "num-server-rounds": 1, "seq-len": 32, "batch-size": 4, "local-steps": 2,
              "lora-r": 4, "max-eval-seqs": 4, "out": str(tmp_path / "runs"),
              "max-update-norm": 50.0}
    stdout = _simulate("poison", config, tmp_path / "cache")
    run_dir = run_dirs(tmp_path / "runs")[-1]
    last = read_metrics(run_dir)[-1]
    assert last["round"] == 1, stdout
    reasons = {f["client"]: f["reason"] for f in last["failures"]}
    assert "holds NaN or Inf" in reasons["client-1"]
    assert "exceeds max-update-norm 50" in reasons["client-2"]
    status = {c["client"]: c["status"] for c in last["clients"]}
    assert status["client-0"] == "trained"
    assert status["client-1"].startswith("rejected: ") and status["client-2"].startswith(
        "rejected: ")
    assert all(c["epsilon"] > 0 for c in last["clients"])  # they trained: their spend counts
    assert last["dropouts"] == []
    adapter = load_file(run_dir / "adapter" / "adapter_model.safetensors")
    assert all(np.isfinite(v).all() and np.abs(v).max() < 10 for v in adapter.values())


@pytest.mark.slow
def test_a_stopped_server_resumes_to_the_same_result(tiny_model, text_clients, tmp_path):
    config = {"model": str(tiny_model), "data": str(text_clients), "num-clients": 2,
              "num-server-rounds": 3, "seq-len": 32, "batch-size": 4, "local-steps": 2,
              "lora-r": 4, "max-eval-seqs": 4, "reproducible": True, "seed": 7}
    cache = tmp_path / "cache"
    _simulate("run", {**config, "out": str(tmp_path / "whole")}, cache)
    stopped = _simulate("stop-after-1", {**config, "out": str(tmp_path / "parts")}, cache)
    assert "ServerApp stopped after round 1" in stopped
    whole_dir = run_dirs(tmp_path / "whole")[-1]
    part_dir = run_dirs(tmp_path / "parts")[-1]
    assert [x["round"] for x in read_metrics(part_dir)] == [0, 1]

    resumed = subprocess.run(
        [sys.executable, "-m", "fedslm.cli", "simulate", "--resume", str(part_dir)],
        capture_output=True, text=True, timeout=300,
        env={**os.environ, "FEDSLM_CACHE_DIR": str(cache), "HF_HUB_OFFLINE": "1"})
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming run {part_dir.name} after round 1" in resumed.stdout

    whole, parts = read_metrics(whole_dir), read_metrics(part_dir)
    assert [x["round"] for x in parts] == [0, 1, 2, 3]
    for a, b in zip(whole, parts, strict=True):
        assert a["eval_loss"] == pytest.approx(b["eval_loss"], rel=1e-6)
        assert a["epsilon"] == b["epsilon"]  # seeded noise: ε = ∞ (null) after round 0
        assert [c["noise_multiplier"] for c in a["clients"]] == \
            [c["noise_multiplier"] for c in b["clients"]]  # the same σ, searched or kept
    final = [load_file(d / "adapter" / "adapter_model.safetensors")
             for d in (whole_dir, part_dir)]
    for key, value in final[0].items():
        np.testing.assert_allclose(final[1][key], value, rtol=0, atol=1e-6)
    assert subprocess.run([sys.executable, "-m", "fedslm.cli", "audit", str(part_dir)],
                          capture_output=True).returncode == 0


def test_resume_of_a_folder_without_checkpoint_is_a_clear_error(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    out = subprocess.run([sys.executable, "-m", "fedslm.cli", "simulate", "--resume",
                          str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert "cannot resume" in out.stderr and "no readable checkpoint" in out.stderr
    out = subprocess.run([sys.executable, "-m", "fedslm.cli", "simulate", "--resume",
                          str(tmp_path), "--rounds", "5"], capture_output=True, text=True)
    assert out.returncode == 2 and "give no other settings" in out.stderr
