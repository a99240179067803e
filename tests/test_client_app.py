"""The ClientApp's replies: adapter tensors and scalar metrics only, never text or token ids."""

from __future__ import annotations

import numpy as np
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict

from client.app import evaluate, train
from client.rounds import Session
from server.config import DEFAULTS

INFO_KEYS = {"client", "status", "energy-method", "quantization", "quantization-reason",
             "compute-dtype", "adapter-config"}


def _message(kind: str, config: dict) -> Message:
    from flwr.supercore.task_identity import TaskIdentity

    # The identity a SuperNode gives the ClientApp's process (run_simulation sets it too).
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 1
    return Message(RecordDict({"config": ConfigRecord(config)}), dst_node_id=1, message_type=kind)


def test_replies_carry_only_the_adapter_and_scalars(tiny_model, text_clients, tmp_path):
    Session._current = None
    config = {**DEFAULTS, "model": str(tiny_model), "data": str(text_clients), "seq-len": 32,
              "batch-size": 4, "local-steps": 2, "lora-r": 4, "server-round": 1,
              "state-root": str(tmp_path)}
    context = Context(run_id=1, node_id=1, node_config={"partition-id": 1}, state=RecordDict(),
                      run_config={})
    reply = train(_message(MessageType.TRAIN, config), context)
    content = reply.content
    assert set(content.keys()) == {"arrays", "metrics", "info"}
    arrays = {k: v.numpy() for k, v in content["arrays"].items()}
    assert arrays and all(".lora_A." in k or ".lora_B." in k for k in arrays)
    assert all(v.dtype == np.float32 for v in arrays.values())
    assert all(isinstance(v, (int, float)) for v in content["metrics"].values())
    assert set(content["info"].keys()) == INFO_KEYS
    assert content["info"]["client"] == "client-1"
    corpus = (text_clients / "client-1" / "lines.txt").read_text()
    for value in content["info"].values():
        assert value not in corpus and corpus[:30] not in value

    reply = evaluate(_message(MessageType.EVALUATE, config), context)
    assert set(reply.content.keys()) == {"metrics", "info", "arrays"}  # given none: the init
    assert all(not v.numpy().any() for k, v in reply.content["arrays"].items() if "lora_B" in k)
    assert reply.content["metrics"]["epsilon"] > 0  # read back from the ledger
    Session._current = None
