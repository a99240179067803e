"""The config contract and the one-line errors a user gets for bad input."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from fedslm.cli import main
from server.config import DEFAULTS, ConfigError, load_file, validate

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
