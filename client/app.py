"""The Flower ClientApp: unpack the message, run the round, pack the reply.

Only LoRA adapter tensors and scalar metrics (plus a few descriptive strings:
client name, quantization mode, adapter config) leave the client.

On a node started by `fedslm supernode` the node config names the node's worker
(client/worker.py), a long-lived process that keeps the model loaded: the round runs
there, and this process (a fresh one per message, Flower's design) only forwards the
message, without importing torch. Otherwise (a simulation, a plain `flower-supernode`,
`fedslm supernode --no-worker`) the round runs in this process.
"""

from __future__ import annotations

import logging
import os
import warnings

from flwr.app import (
    ConfigRecord,
    Context,
    Error,
    Message,
    MetricRecord,
    RecordDict,
)
from flwr.clientapp import ClientApp

from client import worker as worker_mod
from contracts.adapter import Arrays
from contracts.environment import SIMULATION
from contracts.transport import from_record, to_record
from contracts.wire import ARRAYS, CONFIG, INFO, METRICS

# Library chatter that says nothing to a user of the ClientApp's process.
warnings.filterwarnings("ignore", category=DeprecationWarning)
warnings.filterwarnings("ignore", category=FutureWarning)
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # "no fast CPU 4-bit kernel" notice


def _show_progress_on_the_device() -> None:
    """On a device, the round's progress goes to the SuperNode's log; in a simulation the
    engine shows every client's instead (contracts.environment.SIMULATION)."""
    progress = logging.getLogger("fedslm.progress")
    if os.environ.get(SIMULATION) == "1" or progress.handlers:
        return
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s fedslm: %(message)s", "%H:%M:%S"))
    progress.addHandler(handler)
    progress.setLevel(logging.INFO)
    progress.propagate = False


_show_progress_on_the_device()
app = ClientApp()


def _arrays(msg: Message) -> Arrays:
    return from_record(msg.content.array_records.get(ARRAYS))


def _worker(context: Context) -> str:
    """The socket of this node's worker, or "" to run the round in this process."""
    return str(context.node_config.get("worker", "") or "")


def _round(kind: str, msg: Message, context: Context) -> tuple[str, object]:
    """("ok", reply body) or ("dropout", reason): from the node's worker, or run here."""
    request = (kind, dict(msg.content[CONFIG]), dict(context.node_config), _arrays(msg))
    address = _worker(context)
    return worker_mod.call(address, *request) if address else worker_mod.run_round(*request)


def _dropped(msg: Message, reason: str) -> Message:
    """An error reply, as from a device that failed."""
    return Message(error=Error(code=0, reason=reason), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    status, body = _round(worker_mod.TRAIN, msg, context)
    if status == worker_mod.DROPOUT:
        return _dropped(msg, str(body))
    arrays, metrics, info = body
    content = RecordDict({
        ARRAYS: to_record(arrays),
        METRICS: MetricRecord(metrics),
        INFO: ConfigRecord(info),
    })
    return Message(content=content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    _, (initial, metrics, info) = _round(worker_mod.EVALUATE, msg, context)
    content = RecordDict({METRICS: MetricRecord(metrics), INFO: ConfigRecord(info)})
    if initial:  # round 0: the seeded, data-independent initial adapter
        content[ARRAYS] = to_record(initial)
    return Message(content=content, reply_to=msg)
