"""The messages of a round: adapters as ArrayRecords, a client's reply as the engine
reads it, and one exchange of messages with the nodes."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from flwr.app import Array, ArrayRecord, Message
from flwr.serverapp import Grid

from contracts.adapter import Arrays
from contracts.wire import ARRAYS, CLIENT, INFO, METRICS

log = logging.getLogger("fedslm")


@dataclass(eq=False)  # identity: replies hold numpy arrays
class Reply:
    node: int
    client: str
    metrics: dict[str, float]
    info: dict[str, str]
    arrays: Arrays = field(default_factory=dict)  # the update (decoded by validation.py)
    bytes_up: int = 0
    message: Message | None = None  # what the client sent


def to_record(arrays: Arrays) -> ArrayRecord:
    return ArrayRecord({k: Array(v) for k, v in arrays.items()})


def from_record(record: ArrayRecord) -> Arrays:
    return {k: v.numpy() for k, v in record.items()}


def payload_bytes(record: ArrayRecord) -> int:
    return sum(len(array.data) for array in record.values())


def bytes_down(messages: Sequence[Message]) -> int:
    """The adapter bytes the messages carry to the nodes."""
    return sum(payload_bytes(m.content.array_records[ARRAYS]) for m in messages
               if ARRAYS in m.content.array_records)


def read_reply(message: Message) -> Reply:
    content = message.content
    arrays = content.array_records.get(ARRAYS)
    return Reply(
        node=message.metadata.src_node_id,
        client=str(content[INFO][CLIENT]),
        metrics=dict(content[METRICS]),
        info=dict(content[INFO]),
        arrays=from_record(arrays) if arrays else {},
        bytes_up=payload_bytes(arrays) if arrays else 0,
        message=message,
    )


def as_update(reply: Reply) -> Message:
    """The reply's message, carrying the update as validated (int8-delta decoded)."""
    if reply.message is None:
        raise ValueError(f"the reply of {reply.client} was not read from a message")
    reply.message.content[ARRAYS] = to_record(reply.arrays)
    return reply.message


def exchange(grid: Grid, messages: Sequence[Message], rnd: int,
             timeout: float) -> tuple[list[Reply], list[dict[str, Any]]]:
    """Send the messages and wait for the replies: (replies, failures), a failure being
    an error reply or a node that did not answer within `timeout`."""
    if not messages:
        return [], []
    kind = messages[0].metadata.message_type
    replies, failures, answered = [], [], set()
    for msg in grid.send_and_receive(messages, timeout=timeout):
        answered.add(msg.metadata.src_node_id)
        if msg.has_error():
            failures.append({"node": msg.metadata.src_node_id, "reason": msg.error.reason})
        else:
            replies.append(read_reply(msg))
    failures += [{"node": m.metadata.dst_node_id, "reason": f"no reply within {timeout:g}s"}
                 for m in messages if m.metadata.dst_node_id not in answered]
    for failure in failures:
        log.warning("round %d %s: node %s failed: %s", rnd, kind, failure["node"],
                    failure["reason"])
    return replies, failures
