"""Flower messages to and from a client: what a round reads from one and how its reply
is packed, the same for the ClientApp (client/app.py) and a device (client/device.py).

Only LoRA adapter tensors and scalar metrics (plus a few descriptive strings: client
name, quantization mode, adapter config) leave the client.
"""

from __future__ import annotations

from typing import Any

from flwr.app import ConfigRecord, Error, Message, MetricRecord, RecordDict

from contracts.adapter import Arrays
from contracts.transport import from_record, to_record
from contracts.wire import ARRAYS, CONFIG, INFO, METRICS


def config_of(msg: Message) -> dict[str, Any]:
    return dict(msg.content[CONFIG]) if CONFIG in msg.content else {}


def arrays_of(msg: Message) -> Arrays:
    return from_record(msg.content.array_records.get(ARRAYS))


def train_reply(msg: Message, body: tuple) -> Message:
    arrays, metrics, info = body
    content = RecordDict({
        ARRAYS: to_record(arrays),
        METRICS: MetricRecord(metrics),
        INFO: ConfigRecord(info),
    })
    return Message(content=content, reply_to=msg)


def evaluate_reply(msg: Message, body: tuple) -> Message:
    initial, metrics, info = body
    content = RecordDict({METRICS: MetricRecord(metrics), INFO: ConfigRecord(info)})
    if initial:  # round 0: the seeded, data-independent initial adapter
        content[ARRAYS] = to_record(initial)
    return Message(content=content, reply_to=msg)


def error_reply(msg: Message, reason: str) -> Message:
    """An error reply, as from a device that failed."""
    return Message(error=Error(code=0, reason=reason), reply_to=msg)
