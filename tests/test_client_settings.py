"""A client's settings: the server's config as given, defaults from the one schema, and
a SuperNode's node config checked by the same rules."""

from __future__ import annotations

import pytest

from client.settings import ClientSettings, micro_batch
from contracts.config import DEFAULTS, ConfigError, validate


def test_defaults_are_the_schema_defaults():
    s = ClientSettings.from_records({"server-round": 2, "run-id": "r1"}, {})
    assert (s.run_id, s.round) == ("r1", 2)
    assert s.update_encoding == DEFAULTS["update-encoding"] == "int8-delta"
    assert s.max_eval_seqs == DEFAULTS["max-eval-seqs"]
    assert s.micro_batch_tokens == DEFAULTS["micro-batch-tokens"] == "auto"
    assert micro_batch(s.micro_batch_tokens, 64, "float32") == 1  # 64 tokens without bf16
    assert micro_batch(s.micro_batch_tokens, 64, "bfloat16") == 8
    assert micro_batch(0, 64, "float32") == 0 and micro_batch(100, 64) == 1
    assert s.noise_multiplier is None and s.budget_epsilon is None


def test_the_server_config_is_taken_as_given():
    config = {**validate({"lr": 0.5, "update-encoding": "float32", "noise-multiplier": 1.2}),
              "run-id": "r", "server-round": 1, "run-dir": "/somewhere"}
    s = ClientSettings.from_records(config, {})
    assert (s.lr, s.update_encoding, s.noise_multiplier) == (0.5, "float32", 1.2)
    with pytest.raises(ConfigError, match="config key 'batch-size' must be > 0"):
        ClientSettings.from_records({"batch-size": 0}, {})


def test_the_node_config_wins_for_node_keys():
    node = {"quantization": "int8", "partition-id": 2, "lora-r": 4, "budget-epsilon": 3,
            "state-dir": "/state", "flower-own-key": "x", "num-partitions": 5}
    s = ClientSettings.from_records({"lora-r": 16}, node)
    assert (s.quantization, s.partition, s.lora_r, s.budget_epsilon, s.state_dir) == \
        ("int8", 2, 4, 3.0, "/state")


@pytest.mark.parametrize("node, message", [
    ({"quantization": "fp8"}, "node config key 'quantization' must be one of"),
    ({"lora-r": "two"}, "config key 'lora-r' needs a int, got 'two'"),
    ({"partition-id": -1}, "node config key 'partition-id' must be >= 0"),
    ({"budget-epsilon": -2.0}, "node config key 'budget-epsilon' must be >= 0"),
])
def test_a_bad_node_override_is_refused_naming_the_key(node, message):
    with pytest.raises(ConfigError, match=message) as caught:
        ClientSettings.from_records({}, node)
    assert "\n" not in str(caught.value)
    assert caught.value.exit_code == 2


def test_hetlora_rank_comes_from_the_node_or_its_profile():
    config = {"strategy": "hetlora", "lora-r": 8, "lora-alpha": 16.0,
              "simulated-profiles": "server-cpu,raspberry-pi-5"}
    by_profile = [ClientSettings.from_records(config, {"partition-id": p}) for p in (0, 1)]
    assert [(s.device_profile, s.lora_r, s.lora_alpha) for s in by_profile] == \
        [("server-cpu", 8, 16.0), ("raspberry-pi-5", 2, 4.0)]
    own = ClientSettings.from_records(config, {"lora-r": 4, "device-profile": "laptop"})
    assert (own.device_profile, own.lora_r, own.lora_alpha) == ("laptop", 4, 8.0)


def test_releasing_stats_is_the_data_owners_choice(monkeypatch):
    monkeypatch.delenv("FEDSLM_SIMULATION", raising=False)
    assert ClientSettings.from_records({}, {}).release_stats is False  # a device: private
    assert ClientSettings.from_records({}, {"release-stats": "true"}).release_stats is True
    monkeypatch.setenv("FEDSLM_SIMULATION", "1")  # every partition is the simulating user's
    assert ClientSettings.from_records({}, {}).release_stats is True
    assert ClientSettings.from_records({}, {"release-stats": False}).release_stats is False
    with pytest.raises(ConfigError, match="'release-stats' belongs in a SuperNode's node config"):
        validate({"release-stats": True})  # the server cannot ask for it
