"""The ClientApp's replies: adapter tensors and scalar metrics only, never text or token ids."""

from __future__ import annotations

import json

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict

from client.app import evaluate, train
from client.cache import Session
from client.rounds import evaluate_round, train_round
from contracts import wire
from contracts.config import DEFAULTS
from contracts.transport import from_record
from tests.helpers import client_settings

INFO_KEYS = {"client", "status", "energy-method", "quantization", "quantization-reason",
             "compute-dtype", "adapter-config", "ledger-id"}
# Every number a client sends, by message and by the data owner's release-stats choice.
# A new key fails this test until it is declared in contracts/wire.py RELEASES.
SENT = {
    ("train", False): {"epsilon", "delta", "budget-epsilon", "budget-delta", "num-examples",
                       "noise-multiplier", "clip-norm", "sample-rate", "steps"},
    ("evaluate", False): {"num-examples", "epsilon", "delta"},
}
OWNER = {"train": {"train-seconds", "cpu-seconds", "energy-j", "peak-rss-mb"},
         "evaluate": {"eval-loss-sum", "eval-tokens", "eval-correct", "eval-seconds",
                      "energy-j", "peak-rss-mb", "task-choice-items", "task-choice-correct",
                      "task-choice-correct-norm", "task-answer-items", "task-exact",
                      "task-f1-sum"}}
SENT.update({(kind, True): SENT[(kind, False)] | OWNER[kind] for kind in OWNER})


def _message(kind: str, config: dict) -> Message:
    from flwr.supercore.task_identity import TaskIdentity

    # The identity a SuperNode gives the ClientApp's process (run_simulation sets it too).
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 1
    return Message(RecordDict({"config": ConfigRecord(config)}), dst_node_id=1, message_type=kind)


def _round(tiny_model, text_clients, tmp_path, partition: int) -> tuple[dict, Context]:
    """A round-1 config on the tiny model and the context of the node holding `partition`."""
    config = {**DEFAULTS, "model": str(tiny_model), "data": str(text_clients), "seq-len": 32,
              "batch-size": 4, "local-steps": 2, "lora-r": 4, "server-round": 1,
              "state-root": str(tmp_path)}
    return config, Context(run_id=1, node_id=1, node_config={"partition-id": partition},
                           state=RecordDict(), run_config={})


@pytest.mark.parametrize("release", [False, True])
def test_replies_carry_only_declared_keys(tiny_model, text_clients, tmp_path, release):
    """The release inventory: what leaves the device is the adapter (DP), public values
    and data-independent ones; timings, energy, memory and held-out sums only when the
    node's owner set release-stats (a device's default is not to)."""
    Session.forget()
    config, context = _round(tiny_model, text_clients, tmp_path, partition=1)
    context.node_config["release-stats"] = release
    task = tmp_path / "task.jsonl"  # evaluated too: its sums are the owner's to release
    task.write_text(json.dumps({"prompt": "to be", "choices": ["or", "and"], "answer": 0})
                    + "\n" + json.dumps({"prompt": "to be", "answer": "or"}) + "\n")
    config["eval-task"] = str(task)
    reply = train(_message(MessageType.TRAIN, config), context)
    content = reply.content
    assert set(content.keys()) == {"arrays", "metrics", "info"}
    arrays = from_record(content["arrays"])
    assert arrays and all(".lora_A." in k or ".lora_B." in k for k in arrays)
    assert all(v.dtype == np.float32 for v in arrays.values())
    assert set(content["metrics"].keys()) == SENT[("train", release)]
    assert all(isinstance(v, (int, float)) for v in content["metrics"].values())
    assert set(content["info"].keys()) == INFO_KEYS
    assert content["info"]["client"] == "client-1"
    corpus = (text_clients / "client-1" / "lines.txt").read_text()
    for value in content["info"].values():
        assert value not in corpus and corpus[:30] not in value

    reply = evaluate(_message(MessageType.EVALUATE, config), context)
    assert set(reply.content.keys()) == {"metrics", "info", "arrays"}  # given none: the init
    assert all(not v.any() for k, v in from_record(reply.content["arrays"]).items()
               if "lora_B" in k)
    assert set(reply.content["metrics"].keys()) == SENT[("evaluate", release)]
    assert reply.content["metrics"]["epsilon"] > 0  # read back from the ledger
    for kind, sent in SENT.items():
        classes = {wire.RELEASES[k] for k in sent | INFO_KEYS | {"arrays"}}
        allowed = {wire.DP, wire.PUBLIC, wire.DATA_INDEPENDENT}
        assert classes <= (allowed | {wire.OWNER_RELEASED} if kind[1] else allowed)
    Session.forget()


def test_owner_released_keys_are_dropped_and_undeclared_ones_refused():
    values = {wire.EPSILON: 1.0, wire.TRAIN_SECONDS: 2.0}
    assert wire.released(values, release_stats=False) == {wire.EPSILON: 1.0}
    assert wire.released(values, release_stats=True) == values
    with pytest.raises(KeyError):
        wire.released({"loss": 3.0}, release_stats=True)


def test_a_trained_reply_is_an_int8_change_with_its_scales(tiny_model, text_clients, tmp_path):
    Session.forget()
    config, context = _round(tiny_model, text_clients, tmp_path, partition=0)
    initial = evaluate(_message(MessageType.EVALUATE, config), context).content["arrays"]
    message = _message(MessageType.TRAIN, config)
    message.content["arrays"] = initial
    arrays = from_record(train(message, context).content["arrays"])
    values = {k for k in arrays if not k.endswith("#scale")}
    assert values == set(from_record(initial))
    assert all(arrays[k].dtype == np.int8 for k in values)
    assert all(arrays[k + "#scale"].dtype == np.float32 for k in values)
    Session.forget()


def test_one_process_serves_clients_in_turn_with_one_model(tiny_model, text_clients, tmp_path):
    """A simulation actor switching clients keeps its model; each client's results are
    those of a fresh process (the adapter is overwritten before every use)."""
    s0 = client_settings(tiny_model, text_clients, tmp_path, partition_id=0, lora_r=4)
    s1 = client_settings(tiny_model, text_clients, tmp_path, partition_id=1, lora_r=4,
                         release_stats=True)
    Session.forget()
    initial, _, _ = evaluate_round(s0, {})
    model = Session.loaded_model().model
    train_round(s0, initial)  # client 0's trained adapter is now in the shared model
    _, shared, info = evaluate_round(s1, initial)
    assert Session.loaded_model().model is model and info["client"] == "client-1"
    Session.forget()
    _, fresh, _ = evaluate_round(s1, initial)
    assert shared["eval-loss-sum"] == fresh["eval-loss-sum"]
    assert shared["eval-correct"] == fresh["eval-correct"]
    Session.forget()
