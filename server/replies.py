"""The messages of a round: adapters as ArrayRecords (contracts/transport.py), a client's
reply as the engine reads it, and one exchange of messages with the nodes."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from flwr.app import Message
from flwr.serverapp import Grid

from contracts.adapter import Arrays
from contracts.transport import TransportError, from_record, payload_bytes, to_record
from contracts.wire import ARRAYS, CLIENT, CODEC_ERROR, INFO, METRICS

__all__ = ["Reply", "as_update", "bytes_down", "exchange", "from_record", "payload_bytes",
           "read_reply", "to_record"]
log = logging.getLogger("fedslm")
POLL_SECONDS = 0.5  # between pulls of the replies


@dataclass(eq=False)  # identity: replies hold numpy arrays
class Reply:
    node: int
    client: str
    metrics: dict[str, float]
    info: dict[str, str]
    arrays: Arrays = field(default_factory=dict)  # the update (decoded by validation.py)
    bytes_up: int = 0
    message: Message | None = None  # what the client sent


def bytes_down(messages: Sequence[Message]) -> int:
    """The adapter bytes the messages carry to the nodes."""
    return sum(payload_bytes(m.content.array_records[ARRAYS]) for m in messages
               if ARRAYS in m.content.array_records)


def read_reply(message: Message) -> Reply:
    content = message.content
    record = content.array_records.get(ARRAYS)
    info = dict(content[INFO])
    try:
        arrays = from_record(record)
    except TransportError as exc:  # rejected by validation, like an update that won't decode
        arrays, info[CODEC_ERROR] = {}, str(exc)
    return Reply(
        node=message.metadata.src_node_id,
        client=str(info[CLIENT]),
        metrics=dict(content[METRICS]),
        info=info,
        arrays=arrays,
        bytes_up=payload_bytes(record) if record else 0,
        message=message,
    )


def as_update(reply: Reply) -> Message:
    """The reply's message, carrying the update as validated (int8-delta decoded)."""
    if reply.message is None:
        raise ValueError(f"the reply of {reply.client} was not read from a message")
    reply.message.content[ARRAYS] = to_record(reply.arrays)
    return reply.message


def send_and_receive(grid: Grid, messages: Sequence[Message], timeout: float) -> list[Message]:
    """Grid.send_and_receive with a short poll: Flower's gRPC grid sleeps 3 s between
    pulls, on average 1.5 s lost per exchange, two exchanges a round (docs/speed.md)."""
    waiting = set(grid.push_messages(messages))
    every = min(POLL_SECONDS, getattr(grid, "pull_interval", POLL_SECONDS))
    deadline = time.monotonic() + timeout
    out: list[Message] = []
    while waiting:
        got = list(grid.pull_messages(waiting))
        out += got
        waiting -= {m.metadata.reply_to_message_id for m in got}
        if not waiting or time.monotonic() >= deadline:
            break
        time.sleep(every)
    return out


def exchange(grid: Grid, messages: Sequence[Message], rnd: int,
             timeout: float) -> tuple[list[Reply], list[dict[str, Any]]]:
    """Send the messages and wait for the replies: (replies, failures), a failure being
    an error reply or a node that did not answer within `timeout`."""
    if not messages:
        return [], []
    kind = messages[0].metadata.message_type
    replies, failures, answered = [], [], set()
    for msg in send_and_receive(grid, messages, timeout):
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
