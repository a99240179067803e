"""The Flower ClientApp of a simulation (or of a plain `flower-supernode` whose owner
trusts the coordinator): unpack the message, run the round, pack the reply.

A device started by `fedslm supernode` never runs this app as the coordinator ships it:
its own process (client/worker.py, client/device.py) serves the messages under the
owner's policy. Here the run config and the node config are trusted: in a simulation
every partition belongs to the person running it.
"""

from __future__ import annotations

import logging
import os
import warnings

from flwr.app import Context, Message, MessageType
from flwr.clientapp import ClientApp

from client.messages import arrays_of, config_of, error_reply, evaluate_reply, train_reply
from contracts.environment import SIMULATION

# Library chatter that says nothing to a user of the ClientApp's process.
warnings.filterwarnings("ignore", category=DeprecationWarning)
warnings.filterwarnings("ignore", category=FutureWarning)
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # "no fast CPU 4-bit kernel" notice


def _show_progress_on_the_device() -> None:
    """Outside a simulation, the round's progress goes to the SuperNode's log; in a
    simulation the engine shows every client's instead (contracts.environment.SIMULATION)."""
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


def _round(kind: str, msg: Message, context: Context) -> tuple[str, object]:
    from client.rounds import run_round
    from client.settings import ClientSettings

    settings = ClientSettings.from_records(config_of(msg), dict(context.node_config))
    return run_round(kind, settings, arrays_of(msg))


@app.train()
def train(msg: Message, context: Context) -> Message:
    from client.rounds import DROPOUT

    status, body = _round(MessageType.TRAIN, msg, context)
    return error_reply(msg, str(body)) if status == DROPOUT else train_reply(msg, body)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    _, body = _round(MessageType.EVALUATE, msg, context)
    return evaluate_reply(msg, body)
