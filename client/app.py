"""The Flower ClientApp: unpack the message, run the round, pack the reply.

Only LoRA adapter tensors and scalar metrics (plus a few descriptive strings:
client name, quantization mode, adapter config) leave the client.
"""

from __future__ import annotations

import logging
import os
import warnings

from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Error,
    Message,
    MetricRecord,
    RecordDict,
)
from flwr.clientapp import ClientApp

from client.rounds import evaluate_round, simulated_dropout, train_round
from client.settings import ClientSettings
from contracts.adapter import Arrays
from contracts.environment import SIMULATION
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


def _settings(msg: Message, context: Context) -> ClientSettings:
    return ClientSettings.from_records(dict(msg.content[CONFIG]), dict(context.node_config))


def _arrays(msg: Message) -> Arrays:
    record = msg.content.array_records.get(ARRAYS)
    return {k: v.numpy() for k, v in record.items()} if record else {}


@app.train()
def train(msg: Message, context: Context) -> Message:
    settings = _settings(msg, context)
    if simulated_dropout(settings):  # an error reply, as from a device that failed
        reason = f"simulated dropout (dropout-rate={settings.dropout_rate:g})"
        return Message(error=Error(code=0, reason=reason), reply_to=msg)
    arrays, metrics, info = train_round(settings, _arrays(msg))
    content = RecordDict({
        ARRAYS: ArrayRecord({k: Array(v) for k, v in arrays.items()}),
        METRICS: MetricRecord(metrics),
        INFO: ConfigRecord(info),
    })
    return Message(content=content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    initial, metrics, info = evaluate_round(_settings(msg, context), _arrays(msg))
    content = RecordDict({METRICS: MetricRecord(metrics), INFO: ConfigRecord(info)})
    if initial:  # round 0: the seeded, data-independent initial adapter
        content[ARRAYS] = ArrayRecord({k: Array(v) for k, v in initial.items()})
    return Message(content=content, reply_to=msg)
