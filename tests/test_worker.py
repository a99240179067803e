"""The node's worker (client/worker.py) on a real process and socket: it answers a
ClientApp's requests, keeps its model between them, and turns failures into one line;
a ClientApp on a node with a worker does not import torch."""

from __future__ import annotations

import os
import secrets
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from client import worker
from contracts.config import DEFAULTS

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def running_worker(tmp_path):
    """A worker on a socket in a short folder (an AF_UNIX path has ~100 bytes)."""
    folder = Path(os.environ.get("TMPDIR", "/tmp")) / f"fw-{secrets.token_hex(4)}"
    folder.mkdir(mode=0o700)
    address = folder / "worker.sock"
    (folder / worker.KEY_FILE).write_bytes(secrets.token_bytes(32))
    log = open(tmp_path / "worker.log", "wb")  # noqa: SIM115 (closed below)
    proc = subprocess.Popen([sys.executable, "-m", "client.worker", "--address", str(address)],
                            stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    deadline = time.monotonic() + 120
    while not address.exists():
        assert proc.poll() is None and time.monotonic() < deadline, \
            (tmp_path / "worker.log").read_text()
        time.sleep(0.1)
    yield address, (lambda: (tmp_path / "worker.log").read_text())
    proc.terminate()
    assert proc.wait(timeout=30) == 0
    log.close()
    assert not address.exists()  # closing the listener removed the socket
    for path in folder.iterdir():
        path.unlink()
    folder.rmdir()


def _config(tiny_model: Path, data: Path, state: Path, **extra: object) -> dict:
    return {**DEFAULTS, "model": str(tiny_model), "data": str(data), "seq-len": 32,
            "batch-size": 4, "local-steps": 2, "lora-r": 4, "max-eval-seqs": 4,
            "server-round": 0, "state-root": str(state), "threads": 1, **extra}


def test_the_worker_serves_rounds_with_one_model(running_worker, tiny_model, text_clients,
                                                 tmp_path):
    address, log = running_worker
    assert stat.S_IMODE(address.stat().st_mode) == 0o600
    config = _config(tiny_model, text_clients, tmp_path / "state")
    node = {"partition-id": 1, "worker": str(address)}
    status, (initial, metrics, info) = worker.call(str(address), worker.EVALUATE, config,
                                                   node, {})
    assert status == worker.OK and info["client"] == "client-1"
    assert initial and metrics["num-examples"] > 0
    assert "eval-tokens" not in metrics  # a device keeps its held-out sums by default
    status, (update, metrics, _) = worker.call(str(address), worker.TRAIN,
                                               {**config, "server-round": 1}, node, initial)
    assert status == worker.OK and update and metrics["steps"] > 0
    status, reason = worker.call(str(address), worker.TRAIN,
                                 {**config, "dropout-rate": 0.999999}, node, initial)
    assert (status, reason) == (worker.DROPOUT, "simulated dropout (dropout-rate=0.999999)")

    with pytest.raises(worker.WorkerError, match="unknown request kind 'predict'"):
        worker.call(str(address), "predict", config, node, {})
    with pytest.raises(worker.WorkerError, match="seq-len"):  # a bad config: one line
        worker.call(str(address), worker.EVALUATE, {**config, "seq-len": -1}, node, {})
    status, (_, metrics, _) = worker.call(str(address), worker.EVALUATE, config,
                                          {**node, "release-stats": True}, initial)
    assert status == worker.OK  # errors leave the worker serving
    assert metrics["eval-tokens"] > 0  # its owner chose to release them
    assert log().count("model loaded (load #") == 1  # one load for every request
    worker.call(str(address), worker.EVALUATE, {**config, "lora-r": 2}, node, {})
    assert "model loaded (load #2)" in log()  # another model key: loaded again


def test_a_wrong_key_or_no_worker_is_one_clear_line(running_worker, tmp_path):
    address, log = running_worker
    key = address.with_name(worker.KEY_FILE)
    right = key.read_bytes()
    key.write_bytes(secrets.token_bytes(32))
    try:
        with pytest.raises(worker.WorkerError, match=f"worker at {address} is unreachable"):
            worker.call(str(address), worker.EVALUATE, {}, {}, {})
    finally:
        key.write_bytes(right)
    deadline = time.monotonic() + 10
    while "refused a connection" not in log():  # the worker notes it after the refusal
        assert time.monotonic() < deadline, log()
        time.sleep(0.1)
    with pytest.raises(worker.WorkerError, match="unknown request kind"):  # still serving
        worker.call(str(address), "nothing", {}, {}, {})
    missing = tmp_path / "none.sock"
    with pytest.raises(worker.WorkerError, match=f"worker at {missing} is unreachable"):
        worker.call(str(missing), worker.EVALUATE, {}, {}, {})


def test_a_clientapp_with_a_worker_does_not_import_torch(tmp_path):
    """The ClientApp's process forwards to the worker: no torch, no model, even when the
    worker is not there (the error names the socket)."""
    code = f"""
import sys
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.supercore.task_identity import TaskIdentity
from client.app import train
TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 1
msg = Message(RecordDict({{"config": ConfigRecord({{"server-round": 1}})}}), dst_node_id=1,
              message_type=MessageType.TRAIN)
context = Context(run_id=1, node_id=1, node_config={{"worker": "{tmp_path}/w.sock"}},
                  state=RecordDict(), run_config={{}})
try:
    train(msg, context)
except Exception as exc:
    print(type(exc).__name__, exc)
print("torch" in sys.modules, "client.rounds" in sys.modules)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=ROOT, timeout=120)
    lines = out.stdout.splitlines()
    assert lines[-1] == "False False", out.stdout + out.stderr
    assert lines[-2].startswith(f"WorkerError the fedslm worker at {tmp_path}/w.sock is "
                                "unreachable")
