"""The config contract and the one-line errors a user gets for bad input."""

from __future__ import annotations

import os
import tomllib
from pathlib import Path

import numpy as np
import pytest

from contracts.config import DEFAULTS, ConfigError, load_file, validate
from fedslm.cli import main

ROOT = Path(__file__).resolve().parents[1]


def test_pyproject_flower_config_mirrors_the_defaults():
    flwr = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    assert flwr == DEFAULTS


def test_validate_types_and_ranges():
    config = validate({"lora-r": "16", "dp": "false", "lr": "0.5", "noise-multiplier": "1.2"})
    assert (config["lora-r"], config["dp"], config["lr"]) == (16, False, 0.5)
    assert config["noise-multiplier"] == 1.2
    assert validate({})["noise-multiplier"] == "auto"
    for bad, message in [({"lora_r": 4}, "unknown config key 'lora_r'"),
                         ({"lora-r": "x"}, "'lora-r' needs a int"),
                         ({"batch-size": 0}, "'batch-size' must be > 0"),
                         ({"quantization": "fp8"}, "'quantization' must be one of"),
                         ({"delta": 2}, "'delta' must be in"),
                         ({"noise-multiplier": -1}, "'noise-multiplier' must be")]:
        with pytest.raises(ConfigError, match=message):
            validate(bad)


def test_scenario_files(tmp_path):
    (tmp_path / "a.toml").write_text('num-clients = 2\nlora-targets = "q_proj"\n')
    assert load_file(tmp_path / "a.toml") == {"num-clients": 2, "lora-targets": "q_proj"}
    (tmp_path / "b.toml").write_text("num-clients = \n")
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_file(tmp_path / "b.toml")
    with pytest.raises(ConfigError, match="config file not found"):
        load_file(tmp_path / "missing.toml")


@pytest.mark.parametrize("args, message", [
    (["--set", "rounds=2"], "unknown config key 'rounds'"),
    (["--set", "lora-r"], "--set expects key=value"),
    (["--config", "nope.toml"], "config file not found: nope.toml"),
    (["--set", "model=/no/such/model"], "model path not found: /no/such/model"),
    (["--set", "model=missing.gguf"], "model file not found: missing.gguf"),
    (["--set", "data=/no/such/data"], "data path not found: /no/such/data"),
])
def test_bad_input_is_one_line_and_exit_2(args, message, capsys):
    assert main(["simulate", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"fedslm: error: {message}" or err.startswith(f"fedslm: error: {message}")
    assert "\n" not in err


def test_more_clients_than_partitions(tiny_model, text_clients, capsys):
    code = main(["simulate", "--clients", "5", "--set", f"model={tiny_model}",
                 "--set", f"data={text_clients}"])
    assert code == 2
    err = capsys.readouterr().err
    assert "num-clients=5 but data" in err and "has only 3 client partitions" in err


def test_lora_targets_missing_from_the_model(tiny_model, text_clients, capsys):
    code = main(["simulate", "--set", f"model={tiny_model}", "--set", f"data={text_clients}",
                 "--set", "lora-targets=c_attn"])
    assert code == 2
    assert capsys.readouterr().err.strip() == (
        "fedslm: error: LoRA target modules not found in the model: c_attn")


def test_a_model_folder_without_config(tmp_path, capsys):
    (tmp_path / "empty-model").mkdir()
    assert main(["simulate", "--set", f"model={tmp_path / 'empty-model'}"]) == 2
    assert "model folder has no config.json" in capsys.readouterr().err


def test_every_shipped_scenario_and_sweep_file_is_valid():
    from simulations.sweep import read_sweep

    folder = ROOT / "simulations"
    files = sorted(folder.glob("*.toml"))
    assert {f.stem for f in files} >= {"default", "dp-sweep", "strategies", "heterogeneous",
                                       "unreliable", "many-clients", "scale"}
    for path in files:
        if "[grid]" in path.read_text():
            _, runs = read_sweep(path)
            assert len(runs) >= 2
            with pytest.raises(ConfigError, match="is a sweep"):
                load_file(path)
        else:
            validate(load_file(path))


def test_every_key_is_declared_once_with_help_a_check_and_a_scope():
    from contracts import config

    free_form = {"resume", "simulated-profiles", "lora-alpha", "canary-file", "state-root",
                 "seed", "reproducible", "cache-dir", "client", "state-dir", "num-partitions",
                 "dp", "central-dp", "frozen-cache", "worker", "release-stats",
                 "completion-only-loss", "eval-task"}  # paths, names,
    # seeds and booleans (their type is the check)
    for name, key in config.SCHEMA.items():
        assert key.help.strip(), name
        assert callable(key.check), name
        assert key.scope in (config.SERVER, config.CLIENT, config.NODE, config.NODE_ONLY), name
        if key.check is config.anything:
            assert name in free_form, f"{name} has no check"
    assert set(config.NODE_KEYS) >= {"data", "partition-id", "state-dir", "budget-epsilon",
                                     "quantization", "lora-r", "micro-batch-tokens"}
    assert not set(config.NODE_KEYS) & {"target-epsilon", "noise-multiplier", "clip-norm",
                                        "delta", "dp"}  # a node cannot weaken the run's DP


@pytest.mark.parametrize("node, message", [
    ({"partition-id": -1}, "node config key 'partition-id' must be >= 0 and finite, got -1"),
    ({"target-epsilon": 1.0}, "node config key 'target-epsilon' is set by the server"),
    ({"dp": False}, "node config key 'dp' is set by the server"),
    ({"quantization": "fp8"}, "node config key 'quantization' must be one of"),
    ({"lora-r": "x"}, "config key 'lora-r' needs a int"),
    ({"device": "tpu"}, "node config key 'device' must be auto, cpu, cuda or cuda:N"),
])
def test_a_bad_node_override_is_refused_naming_the_key(node, message):
    from contracts.config import validate_node

    with pytest.raises(ConfigError, match=message) as info:
        validate_node(node)
    assert "\n" not in str(info.value)
    assert validate_node({"partition-id": 2, "flower-own-key": 1}) == {"partition-id": 2}


def test_infinite_values_are_refused():
    for key in ("clip-norm", "progress-seconds", "lr", "max-update-norm"):
        with pytest.raises(ConfigError, match=f"'{key}' must be .* and finite, got inf"):
            validate({key: "inf"})


def test_resolve_defaults_file_flags_and_resume(tmp_path):
    from contracts.config import resolve

    (tmp_path / "s.toml").write_text("num-clients = 2\nlr = 0.5\n")
    config = resolve(file=tmp_path / "s.toml", flags={"lr": "0.25"})
    assert (config["num-clients"], config["lr"], config["lora-r"]) == (2, 0.25, 8)
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text('{"num-clients": 2, "lr": 0.125, "run-id": "x"}')
    assert resolve(flags={"resume": str(run)})["lr"] == 0.125
    with pytest.raises(ConfigError, match="give no other settings"):
        resolve(flags={"resume": str(run), "num-server-rounds": 3})
    flwr = resolve(run_config={**DEFAULTS, "resume": str(run)})  # `flwr run`: pyproject's keys
    assert flwr["resume"] == str(run.resolve()) and flwr["lr"] == 0.125


def _cli_error(args: list[str], capsys) -> str:
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("fedslm: error: ") and "\n" not in err, err
    return err


def test_certs_bad_targets_and_counts(tmp_path, capsys):
    (tmp_path / "a-file").write_text("x")
    assert "is a file, not a folder" in _cli_error(["certs", str(tmp_path / "a-file")], capsys)
    assert "--nodes must be >= 0, got -1" in _cli_error(
        ["certs", str(tmp_path / "c"), "--nodes", "-1"], capsys)
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if not os.access(locked, os.W_OK):  # root writes anywhere: then nothing to refuse
            assert "cannot write certificates into" in _cli_error(
                ["certs", str(locked / "sub")], capsys)
        else:
            (locked / "blocker").write_text("x")
            err = _cli_error(["certs", str(locked / "blocker" / "sub")], capsys)
            assert "cannot write certificates into" in err
    finally:
        locked.chmod(0o700)


@pytest.mark.parametrize("args, message", [
    (["--node-config", "garbage"], "--node-config must be key=value pairs, got 'garbage'"),
    (["--node-config", "threads=-1"], "node config key 'threads' must be >= 0"),
    (["--node-config", "partition-id=1"], "node config key 'partition-id' is the device "
     "policy's"),
    (["--node-config", "lora-r=x"], "--node-config values must be numbers"),
    (["--node-config", "dp=false"], "node config key 'dp' is set by the server"),
    (["--superlink", "localhost"], "--superlink must be HOST:PORT, got 'localhost'"),
    (["--superlink", "127.0.0.1:99999"], "--superlink must be HOST:PORT"),
    (["--port", "0"], "--port must be a port in 1..65535, got 0"),
])
def test_supernode_refuses_bad_values_at_start(args, message, tmp_path, capsys):
    policy = tmp_path / "policy.toml"
    policy.write_text("budget-epsilon = 8.0\n")
    err = _cli_error(["supernode", "--insecure", "--state", str(tmp_path / "s"),
                      "--policy", str(policy), *args], capsys)
    assert message in err
    assert not (tmp_path / "s").exists()  # refused before anything was written


def test_report_and_compare_on_metrics_missing_keys(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text("{}")
    (run / "metrics.jsonl").write_text('{"round": 0, "clients": []}\n')
    for command in ("report", "compare"):
        err = _cli_error([command, str(run)], capsys)
        assert "metrics.jsonl:1 lacks eval_loss" in err
    (run / "metrics.jsonl").write_text("{not json\n")
    assert "metrics.jsonl:1 is not JSON" in _cli_error(["compare", str(run)], capsys)


def test_resume_with_a_corrupt_checkpoint(tmp_path, capsys):
    from contracts.rundir import save_checkpoint

    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "metrics.jsonl").write_text("")
    save_checkpoint(tmp_path, {"round": 1}, {"a": np.zeros(3, dtype=np.float32)})
    (tmp_path / "checkpoint" / "round-1.safetensors").write_bytes(b"\x00garbage")
    err = _cli_error(["simulate", "--resume", str(tmp_path)], capsys)
    assert "cannot resume" in err and "round-1.safetensors is corrupt" in err
