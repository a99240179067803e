"""A real Flower simulation (Ray backend) through the `fedslm` command, checked against
the run-directory contract; a failing run exits non-zero; Ray stays on loopback."""

from __future__ import annotations

import ipaddress
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest

from contracts.rundir import run_dirs
from privacy.ledger import Ledger

RUN_KEYS = {"round", "eval_loss", "perplexity", "token_accuracy", "epsilon", "delta",
            "round_seconds", "bytes_up", "bytes_down", "clients", "energy_j",
            "loss_drop_per_kj", "central_epsilon", "dropouts", "failures"}
CLIENT_KEYS = {"client", "status", "epsilon", "num_examples", "train_seconds", "eval_seconds",
               "energy_j", "energy_method", "peak_rss_mb", "bytes_up", "bytes_down",
               "samples_per_second", "eval_loss", "quantization"}

pytestmark = pytest.mark.slow


TAG = "FEDSLM_TEST_TAG"  # marks the processes a test starts (Ray's workers inherit it)


def _fedslm(args: list[str], cache: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "FEDSLM_CACHE_DIR": str(cache), "HF_HUB_OFFLINE": "1", TAG: str(cache)}
    return subprocess.run([sys.executable, "-m", "fedslm.cli", *args], capture_output=True,
                          text=True, env=env, timeout=timeout)


def _ray_processes_since(start: float, tag: str) -> list[str]:
    """Ray processes of the test tagged `tag` still alive: its raylet, GCS and workers
    carry the tag; Ray's agents do not, so an untagged one counts when its parent does
    (an agent orphaned by an exited raylet is missed; a leftover raylet is not). A
    simulation someone runs beside the tests is not the test's."""
    found = []
    for p in psutil.process_iter(["name", "cmdline", "create_time"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if p.info["create_time"] < start or not ("raylet" in cmd or "gcs_server" in cmd
                                                 or "ray::" in cmd):
            continue
        if tag in (_tag(p), _tag(_parent(p))):
            found.append(cmd[:80])
    return found


def _tag(p: psutil.Process | None) -> str | None:
    try:
        return p.environ().get(TAG) if p else None
    except psutil.Error:
        return None


def _parent(p: psutil.Process) -> psutil.Process | None:
    try:
        return p.parent()
    except psutil.Error:
        return None


def test_two_clients_two_rounds_write_the_run_directory(tiny_model, text_clients, tmp_path):
    from peft import PeftModel, get_peft_model_state_dict

    from client import base_model as model_mod

    task = tmp_path / "task.jsonl"  # one item for every client, one for client-0 only
    task.write_text("\n".join(json.dumps(item) for item in (
        {"prompt": "to be", "choices": ["or", "and", "the"], "answer": "or"},
        {"prompt": "what", "choices": ["a", "b"], "answer": 1, "client": "client-0"},
        {"prompt": "to be or", "answer": ["not", "not to be"]})))
    start = time.time()
    out = _fedslm(["simulate", "--clients", "2", "--rounds", "2", "--local-steps", "3",
                   "--out", str(tmp_path / "runs"), "--set", f"model={tiny_model}",
                   "--set", f"data={text_clients}", "--set", "seq-len=32",
                   "--set", "batch-size=4", "--set", f"eval-task={task}",
                   "--set", "task-max-new-tokens=3"], tmp_path / "cache")
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.strip().splitlines()
    assert [ln.split()[1] for ln in lines if ln.startswith("round ")] == ["0/2", "1/2", "2/2"]
    assert all("task acc" in ln and "(norm" in ln and "3 items" in ln and "2 answers" in ln
               for ln in lines if ln.startswith("round "))
    run_dir = Path(lines[-1])
    assert run_dir.parent == tmp_path / "runs"

    config = json.loads((run_dir / "config.json").read_text())
    assert config["num-clients"] == 2 and config["model"] == str(tiny_model)

    metrics = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["round"] for m in metrics] == [0, 1, 2]
    for m in metrics:
        assert RUN_KEYS <= set(m)
        assert m["perplexity"] == pytest.approx(math.exp(m["eval_loss"]))
        assert len(m["clients"]) == 2
        for c in m["clients"]:
            assert CLIENT_KEYS <= set(c)
            assert c["energy_method"].startswith(("measured:", "estimated:"))
            assert c["energy_j"] > 0
        assert m["epsilon"] == max(c["epsilon"] for c in m["clients"])
        assert (m["task_items"], m["task_answers"]) == (3, 2)
        assert all(0 <= m[k] <= 1 for k in ("task_accuracy", "task_accuracy_norm",
                                            "task_exact_match", "task_f1"))
    assert metrics[0]["epsilon"] == 0 and metrics[0]["bytes_down"] == 0  # clients send the init
    assert 0 < metrics[1]["epsilon"] < metrics[2]["epsilon"] <= 8.0
    assert all(m["bytes_up"] > 0 and m["bytes_down"] > 0 for m in metrics[1:])
    assert all(c["samples_per_second"] > 0 for m in metrics[1:] for c in m["clients"])
    assert metrics[0]["loss_drop_per_kj"] is None and metrics[2]["loss_drop_per_kj"] is not None

    base, _ = model_mod.load_base(str(tiny_model), model_mod.Quantization("none", "float32", ""),
                                  model_mod.pick_device("cpu"))
    adapter = get_peft_model_state_dict(PeftModel.from_pretrained(base, run_dir / "adapter"))
    assert any(np.abs(v.numpy()).sum() > 0 for k, v in adapter.items() if "lora_B" in k)

    for c in metrics[-1]["clients"]:
        with Ledger(run_dir / "clients" / c["client"] / "ledger.sqlite", create=False) as ledger:
            assert ledger.verify() == []
            entries = ledger.entries()
            assert [e.round for e in entries] == [1, 2]
            assert entries[-1].epsilon == pytest.approx(c["epsilon"])
    assert _ray_processes_since(start, tag=str(tmp_path / "cache")) == []


def test_a_run_whose_clients_all_fail_exits_non_zero(tiny_model, tmp_path):
    data = tmp_path / "small"
    for name in ("a", "b"):
        (data / name).mkdir(parents=True)
        (data / name / "t.txt").write_text("too short")
    out = _fedslm(["simulate", "--clients", "2", "--rounds", "1", "--out", str(tmp_path / "r"),
                   "--set", f"model={tiny_model}", "--set", f"data={data}"], tmp_path / "cache")
    assert out.returncode == 1
    assert "fedslm: run failed: round 0: no client could evaluate" in out.stderr
    assert "at least 10 are needed for a held-out split" in out.stderr


RAY_PROBE = """
import json, os, psutil
from contracts.environment import apply_loopback
apply_loopback()
import ray
ray.init(num_cpus=1, include_dashboard=False, logging_level="ERROR")
node = ray.nodes()[0]["NodeManagerAddress"]
addresses = set()
me = psutil.Process()
for p in [me, *me.children(recursive=True)]:
    try:
        addresses |= {c.laddr.ip for c in p.net_connections("inet") if c.status == "LISTEN"}
    except psutil.Error:
        pass
ray.shutdown()
print(json.dumps({"node": node, "listen": sorted(addresses)}))
"""


def test_ray_binds_to_loopback_only(tmp_path):
    env = {**os.environ, "FEDSLM_CACHE_DIR": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", RAY_PROBE], capture_output=True, text=True,
                         env=env, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["node"] == "127.0.0.1"
    assert report["listen"], "found no listening Ray socket to check"
    for address in map(ipaddress.ip_address, report["listen"]):
        mapped = getattr(address, "ipv4_mapped", None)
        assert (mapped or address).is_loopback, f"Ray listens on {address}"
    assert (tmp_path / "ray-home" / "ray_bootstrap_config.yaml").is_file()


def test_flwr_run_on_a_local_superlink(tiny_model, text_clients, tmp_path):
    """`flwr run .` (through the wrapper that keeps it on loopback and stops the SuperLink)."""
    def flwr_run(extra: str) -> subprocess.CompletedProcess:
        config = (f"num-clients=2 num-server-rounds=1 local-steps=2 model='{tiny_model}' "
                  f"data='{text_clients}' seq-len=32 batch-size=4 out='{tmp_path / 'runs'}' "
                  + extra)
        env = {**os.environ, "FEDSLM_CACHE_DIR": str(tmp_path / "cache")}
        return subprocess.run([sys.executable, "-m", "simulations.flwr_local", "--supernodes",
                               "2", "--run-config", config], capture_output=True, text=True,
                              env=env, timeout=300)

    start = time.time()
    out = flwr_run("")
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert "flwr run status: finished:completed" in out.stdout
    (run_dir,) = run_dirs(tmp_path / "runs")
    rounds = [json.loads(x)["round"] for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert rounds == [0, 1]
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()

    failed = flwr_run("lora-targets='c_attn'")
    assert failed.returncode == 1
    assert "flwr run status: finished:failed" in failed.stdout
    assert not [p for p in psutil.process_iter(["cmdline", "create_time"])
                if p.info["create_time"] >= start
                and "flower-superlink" in " ".join(p.info["cmdline"] or [])]


def test_budgets_central_dp_and_audit_in_a_run(tiny_model, text_clients, tmp_path):
    """client-0 arrives with most of its budget spent (an earlier run): it never trains,
    the run goes on with client-1, the server adds user-level DP, and the audit passes."""
    from privacy.accountant import epsilon
    from privacy.ledger import Entry

    state = tmp_path / "state"
    earlier = (0.7, 0.1, 60)
    spent = epsilon([earlier], 1e-5)
    with Ledger(state / "client-0" / "ledger.sqlite") as ledger:
        ledger.append(Entry("an-earlier-run", 1, "client-0", "fp", *earlier, 1e-5, "pld", spent,
                            "t", budget_epsilon=spent + 0.5, relation="replace-one"))
    out = _fedslm(["simulate", "--clients", "2", "--rounds", "2", "--local-steps", "3",
                   "--out", str(tmp_path / "runs"), "--set", f"model={tiny_model}",
                   "--set", f"data={text_clients}", "--set", "seq-len=32",
                   "--set", "batch-size=4", "--set", f"state-root={state}",
                   "--set", f"budget-epsilon={spent + 0.5}", "--set", "central-dp=true",
                   "--set", "central-noise-multiplier=2.0"], tmp_path / "cache")
    assert out.returncode == 0, out.stderr[-3000:]
    run_dir = Path(out.stdout.strip().splitlines()[-1])
    metrics = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    for m in metrics[1:]:
        rows = {c["client"]: c for c in m["clients"]}
        assert rows["client-1"]["status"] == "trained"
        assert rows["client-0"]["status"].startswith("refused: ")
        assert [d["client"] for d in m["dropouts"]] == ["client-0"]
    assert 0 < metrics[1]["central_epsilon"] < metrics[2]["central_epsilon"]
    with Ledger(state / "client-0" / "ledger.sqlite", create=False) as ledger:
        assert len(ledger.entries()) == 1  # nothing charged, nothing trained
    with Ledger(run_dir / "server" / "ledger.sqlite", create=False) as ledger:
        assert [e.round for e in ledger.entries()] == [1, 2]
        assert ledger.entries()[-1].epsilon == pytest.approx(metrics[2]["central_epsilon"])

    audit = subprocess.run([sys.executable, "-m", "fedslm.cli", "audit", str(run_dir),
                            "--json"], capture_output=True, text=True, timeout=120)
    assert audit.returncode == 0, audit.stdout + audit.stderr
    result = json.loads(audit.stdout)
    assert [c["client"] for c in result["clients"]] == ["client-0", "client-1",
                                                        "server:user-level"]
    assert all(c["within_budget"] and c["chain_intact"] for c in result["clients"])
