"""A device serves a coordinator's messages under its owner's policy (client/device.py):
hostile run configs are refused or clamped, the run's plan is a contract, noise is the
device's own, and the server hears only a short code. Real messages, a real tiny model,
real ledgers; the deployment itself is in tests/test_deployment.py."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from flwr.app import ConfigRecord, Message, RecordDict

from client.cache import Session
from client.device import Device
from client.messages import evaluate_reply
from client.policy import CODES, PolicyError, load_policy, model_digest, policy_from
from contracts.config import DEFAULTS
from contracts.transport import from_record, to_record
from privacy.device_record import DeviceState
from privacy.ledger import Ledger

RUN_ID = "device-test-run"


@pytest.fixture
def device(tiny_model, text_clients, tmp_path) -> Device:
    Session.forget()
    policy = policy_from({"budget-epsilon": 40.0, "max-epsilon-per-run": 30.0,
                          "models": [str(tiny_model)], "data": str(text_clients),
                          "partition-id": 1, "seq-len": 32, "max-local-steps": 4,
                          "max-rounds-per-run": 3, "max-batch-size": 8, "max-lora-r": 4})
    return Device(policy, {"threads": 1}, tmp_path / "device-a", "127.0.0.1:9092")


def _config(tiny_model, **overrides) -> dict:
    config = {**{k: v for k, v in DEFAULTS.items()}, "model": str(tiny_model), "seq-len": 32,
              "batch-size": 4, "local-steps": 2, "lora-r": 4, "num-server-rounds": 2,
              "run-id": RUN_ID, "server-round": 1, "target-epsilon": 20.0}
    server_only = ("num-clients", "out", "round-timeout", "node-wait", "min-replies",
                   "max-update-norm", "resume", "clients-per-round", "eval-clients",
                   "client-cpus", "audit-canaries", "central-dp", "central-noise-multiplier",
                   "central-clip-norm")
    for key in server_only:
        config.pop(key, None)
    config.update({k.replace("_", "-"): v for k, v in overrides.items()})
    return config


def _message(kind: str, config: dict, run: int = 1, arrays: dict | None = None) -> Message:
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, run, 1
    content = RecordDict({"config": ConfigRecord(config)})
    if arrays:
        content["arrays"] = to_record(arrays)
    return Message(content, dst_node_id=1, message_type=kind)


def _initial(device: Device, tiny_model) -> dict:
    """Round 0: the seeded initial adapter the server sends every client."""
    reply = device.handle(_message("evaluate", _config(tiny_model, server_round=0)))
    assert not reply.has_error(), reply.error.reason
    return from_record(reply.content.array_records["arrays"])


def _train(device: Device, tiny_model, arrays: dict, run: int = 1, **overrides) -> Message:
    return device.handle(_message("train", _config(tiny_model, **overrides), run, arrays))


def _entries(device: Device) -> list:
    path = device.state_dir / "ledger.sqlite"
    if not path.is_file():
        return []
    with Ledger(path, create=False) as ledger:
        return ledger.entries()


HOSTILE = {
    "dp=false": {"dp": False},
    "noise-multiplier=0": {"noise_multiplier": 0.0},
    "delta=0.5": {"delta": 0.5},
    "reproducible=true seed=7": {"reproducible": True, "seed": 7},
    "canary-file": {"canary_file": "/etc/hostname"},
    "seq-len=2": {"seq_len": 2},
    "a model the owner did not allow": {"model": "/tmp/some-other-model"},
    "rounds over the cap": {"num_server_rounds": 50},
    "steps over the cap": {"local_steps": 40},
    "a clip norm in float32's denormals": {"clip_norm": 1e-40},
    "a longer privacy unit": {"seq_len": 64},
    "a fixed sigma too small for the lifetime budget": {"noise_multiplier": 0.05,
                                                        "budget_epsilon": 2.0},
}
OVER_BUDGET = {"a fixed sigma too small for the lifetime budget"}


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_a_hostile_run_config_is_refused_with_a_code_only(device, tiny_model, caplog, name):
    initial = _initial(device, tiny_model)
    with caplog.at_level(logging.WARNING, logger="fedslm.device"):
        reply = _train(device, tiny_model, initial, **HOSTILE[name])
    code = "over-budget" if name in OVER_BUDGET else "refused-by-policy"
    assert reply.has_error() and reply.error.reason == code
    assert _entries(device) == []  # nothing charged, nothing trained, nothing released
    assert f"refused ({code})" in caplog.text  # the reason is in the device's log
    with DeviceState(device.state_dir) as state:
        (refusal,) = state.refusals()
    assert refusal.code == code and refusal.reason


def test_the_owner_decides_data_name_and_state_whatever_the_run_says(device, tiny_model,
                                                                      tmp_path, caplog):
    secret = tmp_path / "secret.jsonl"
    secret.write_text('{"text": "the coordinator chose this file"}\n' * 50)
    initial = _initial(device, tiny_model)
    with caplog.at_level(logging.INFO, logger="fedslm.device"):
        reply = _train(device, tiny_model, initial, data=str(secret),
                       state_root=str(tmp_path / "elsewhere"), eval_task=str(secret))
    assert not reply.has_error(), reply.error.reason
    info = dict(reply.content["info"])
    assert info["client"] == "device-a"  # the owner's choice (the state folder), no file stem
    assert "ignored, this device's policy decides" in caplog.text
    (entry,) = _entries(device)  # in the device's own state folder, not `state-root`
    assert not (tmp_path / "elsewhere").exists()
    assert entry.dataset == Session.get(device.settings(_config(tiny_model))).train.fingerprint()
    # the policy's partition 1 of the policy's data, not the server's file
    assert int(dict(reply.content["metrics"])["num-examples"]) == \
        len(Session.get(device.settings(_config(tiny_model))).train)


def test_the_plan_is_the_contract(device, tiny_model):
    initial = _initial(device, tiny_model)
    first = _train(device, tiny_model, initial)
    assert not first.has_error(), first.error.reason
    sigma = dict(first.content["metrics"])["noise-multiplier"]
    changed = _train(device, tiny_model, initial, server_round=2, num_server_rounds=3)
    assert changed.has_error() and changed.error.reason == "bad-plan"
    lied = _train(device, tiny_model, initial, server_round=2, target_epsilon=25.0)
    assert lied.has_error() and lied.error.reason == "bad-plan"
    second = _train(device, tiny_model, initial, server_round=2)
    assert dict(second.content["metrics"])["noise-multiplier"] == sigma
    beyond = _train(device, tiny_model, initial, server_round=3)  # a third round of two
    assert beyond.has_error() and beyond.error.reason == "bad-plan"
    assert [e.round for e in _entries(device)] == [1, 2]  # the spend stays as planned
    with DeviceState(device.state_dir) as state:
        ((run, coordinator, _, plan),) = state.plans()
        assert [r.code for r in state.refusals()] == ["bad-plan"] * 3
    assert plan["sigma"] == sigma and plan["num-server-rounds"] == 2
    assert coordinator == "127.0.0.1:9092" and run == "1"
    # the owner's audit recomputes the run's ε from the ledger: the plan's, to the PLD's grid
    from privacy.audit import audit

    report = audit(device.state_dir)
    (spent,) = report["device"]["runs"]
    assert report["ok"] and spent["rounds"] == 2 and spent["planned_rounds"] == 2
    assert spent["coordinator"] == coordinator
    assert spent["epsilon"] == pytest.approx(plan["run-epsilon"], rel=1e-3)
    assert [r["code"] for r in report["device"]["refusals"]] == ["bad-plan"] * 3


def test_the_same_server_seed_gives_different_adapters(device, tiny_model):
    """The coordinator knows `seed`; the device's noise and draws must not follow it."""
    initial = _initial(device, tiny_model)
    one = _train(device, tiny_model, initial, run=1, seed=7)
    two = _train(device, tiny_model, initial, run=2, seed=7, run_id="another-run")
    assert not one.has_error() and not two.has_error()
    a, b = (from_record(r.content.array_records["arrays"]) for r in (one, two))
    assert any(not np.array_equal(a[k], b[k]) for k in a)


def test_a_budget_refusal_and_a_failure_tell_the_server_a_code(device, tiny_model, tmp_path,
                                                              caplog):
    initial = _initial(device, tiny_model)
    over = _train(device, tiny_model, initial, budget_epsilon=0.01, noise_multiplier=0.8)
    assert over.has_error() and over.error.reason == "over-budget"
    (device.state_dir / "cache").mkdir(parents=True, exist_ok=True)
    broken = Device(device.policy.__class__(**{**device.policy.__dict__,
                                               "data": str(tmp_path / "missing.jsonl")}),
                    device.node_config, device.state_dir, device.coordinator)
    with caplog.at_level(logging.WARNING, logger="fedslm.device"):
        failed = broken.handle(_message("evaluate", _config(tiny_model, server_round=0)))
    assert failed.has_error() and failed.error.reason == "internal"
    assert "missing.jsonl" in caplog.text  # the detail stays on the device
    assert {r.code for r in DeviceState(device.state_dir).refusals()} <= set(CODES)


def test_evaluate_under_the_policy_releases_no_stats_by_default(device, tiny_model):
    reply = device.handle(_message("evaluate", _config(tiny_model, server_round=0)))
    assert "eval-loss-sum" not in dict(reply.content["metrics"])
    assert reply.content.array_records["arrays"]  # the data-independent initial adapter
    assert evaluate_reply  # the same packing as the ClientApp's


def test_a_policy_file_is_checked_with_one_line(tmp_path, tiny_model):
    path = tmp_path / "policy.toml"
    for text, expected in [("data = 'x'\n", "budget-epsilon"),
                           ("budget-epsilon = 8\nbudget = 1\n", "unknown key 'budget'"),
                           ("budget-epsilon = 'eight'\n", "'budget-epsilon' must be a float"),
                           ("budget-epsilon = 8\nmax-delta = 0.5\nbudget-delta = 2.0\n",
                            "'budget-delta' is out of range"),
                           ("budget-epsilon = [\n", "cannot read policy file")]:
        path.write_text(text)
        with pytest.raises(PolicyError, match=expected) as err:
            load_policy(path)
        assert "\n" not in str(err.value) and str(path.name) in str(err.value)
    with pytest.raises(PolicyError, match="not found"):
        load_policy(tmp_path / "none.toml")
    from client import policy as policy_mod

    digest = model_digest(tiny_model)
    path.write_text(f"budget-epsilon = 8\nmodels = ['{tiny_model}@sha256:{digest}']\n")
    policy = load_policy(path)
    assert policy_mod.model_allowed(policy, str(tiny_model))
    assert not policy_mod.model_allowed(policy, "embedded")
    path.write_text(f"budget-epsilon = 8\nmodels = ['{tiny_model}@sha256:{'0' * 64}']\n")
    assert not policy_mod.model_allowed(load_policy(path), str(tiny_model))  # other content


def test_a_model_the_policy_does_not_name_is_never_read(device, monkeypatch):
    """The coordinator names a path: the device must not look at it (timing, errors)."""
    from client import policy as policy_mod

    monkeypatch.setattr(policy_mod, "model_digest", lambda path: pytest.fail(f"read {path}"))
    pinned = policy_mod.Policy(**{**device.policy.__dict__,
                                  "models": ("/opt/model@sha256:" + "0" * 64,)})
    assert not policy_mod.model_allowed(pinned, "/")


def test_a_run_id_is_one_runs(device, tiny_model):
    """The ledger knows a run by the server's run-id: a second Flower run under the same
    run-id, or a run without one, is refused (its spend would count as another run's)."""
    initial = _initial(device, tiny_model)
    assert not _train(device, tiny_model, initial, run=1).has_error()
    again = _train(device, tiny_model, initial, run=2)  # same run-id, another Flower run
    assert again.has_error() and again.error.reason == "bad-plan"
    config = _config(tiny_model)
    del config["run-id"]
    nameless = device.handle(_message("train", config, 3, initial))
    assert nameless.has_error() and nameless.error.reason == "bad-plan"


@pytest.mark.parametrize("asked", [{"target_epsilon": 35.0}, {"noise_multiplier": 0.05}])
def test_a_run_asking_for_more_epsilon_than_the_policy_gets_more_noise(device, tiny_model,
                                                                      asked):
    """max-epsilon-per-run = 30: a target of 35, or a fixed σ that would cost more, is
    clamped (more noise is always allowed): the run's own ε is at most 30."""
    from privacy.accountant import epsilon

    initial = _initial(device, tiny_model)
    reply = _train(device, tiny_model, initial, **asked)
    assert not reply.has_error(), reply.error.reason
    metrics = dict(reply.content["metrics"])
    with DeviceState(device.state_dir) as state:
        ((_, _, _, plan),) = state.plans()
    assert plan["sigma"] == metrics["noise-multiplier"] > asked.get("noise_multiplier", 0)
    assert plan["run-epsilon"] <= 30.0
    run = [(plan["sigma"], plan["sample-rate"], 2 * 2)]  # 2 steps x 2 rounds
    assert epsilon(run, 1e-5) == pytest.approx(plan["run-epsilon"])
    assert 29.0 < plan["run-epsilon"]  # not more noise than the cap needs (0.5% search)


def test_the_devices_resources_are_its_own(device, tiny_model):
    """threads, profile, quantization ...: the node config's, else the defaults."""
    s = device.settings(_config(tiny_model, threads=64, device_profile="raspberry-pi-5",
                                quantization="nf4", micro_batch_tokens=0))
    assert (s.threads, s.device_profile, s.quantization, s.micro_batch_tokens) == \
        (1, "generic-cpu", "auto", "auto")
