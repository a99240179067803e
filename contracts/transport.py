"""Adapters in messages: a whole set of arrays travels as ONE Flower Array (safetensors
bytes), not one Array per tensor.

Flower's SuperLink stores and forwards each Array of a message as an object of its
own; an all-projection adapter is 420 tensors (840 arrays with the int8 scales), and on
a 2-core machine the SuperLink spent ~90 s of CPU per round on them (docs/speed.md).
One Array per message costs it a fraction of a second. safetensors is a maintained,
self-describing format that cannot carry code.

A record of separate Arrays (a client written against plain Flower) is read as well.
"""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord
from safetensors import SafetensorError
from safetensors.numpy import load, save

from contracts.adapter import Arrays
from contracts.errors import FedslmError

PACKED = "safetensors"  # the one key of a packed record


class TransportError(FedslmError):
    """A packed record whose bytes are not a safetensors file."""


def to_record(arrays: Arrays) -> ArrayRecord:
    if not arrays:
        return ArrayRecord()
    packed = np.frombuffer(save(dict(arrays)), dtype=np.uint8)
    return ArrayRecord({PACKED: Array(packed)})


def from_record(record: ArrayRecord | None) -> Arrays:
    if not record:
        return {}
    if set(record) == {PACKED}:
        try:
            return dict(sorted(load(record[PACKED].numpy().tobytes()).items()))
        except (SafetensorError, ValueError) as exc:
            raise TransportError(f"a packed adapter record is unreadable ({exc})") from None
    return {k: v.numpy() for k, v in record.items()}


def payload_bytes(record: ArrayRecord) -> int:
    return sum(len(array.data) for array in record.values())
