"""Which updates may be aggregated: each is decoded against the adapter it was sent
(contracts/codec.py) and must have that adapter's names, shapes and dtypes, hold only
finite values and not move it further than `max-update-norm` (a number, 0 = no limit,
or `auto`: server/bounds.py)."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from functools import partial
from typing import Any

import numpy as np

from contracts import codec
from contracts.adapter import Arrays
from contracts.wire import CODEC_ERROR, STATUS, Status, status_text
from server.bounds import AutoNorm
from server.errors import TooFewUpdates
from server.replies import Reply

log = logging.getLogger("fedslm")
Expected = Callable[[Arrays], Arrays]  # an update -> the adapter it must fit
Limit = float | Callable[[int], float]  # fixed (0: none), or `auto`: values sent -> bound


def max_update_norm(config: dict[str, Any]) -> float | AutoNorm:
    """The run's `max-update-norm`: a number (0 = no limit) or, for `auto`, the bound
    of each reply's own local training."""
    value = config["max-update-norm"]
    return AutoNorm.from_config(config) if value == "auto" else float(value)


def update_norm(update: Arrays, reference: Arrays) -> float:
    """L2 norm of (update - reference) over all tensors."""
    return float(np.sqrt(sum(
        np.sum((update[k].astype(np.float64) - reference[k].astype(np.float64)) ** 2)
        for k in reference)))


def problems_with(update: Arrays, expected: Arrays, max_norm: Limit = 0.0) -> str | None:
    """Why an update cannot be aggregated, or None when it can.

    `expected` is the global adapter the client was sent: the update must have its
    tensor names, shapes and dtypes, hold only finite values, and differ from it by at
    most `max_norm` in L2 norm: a number (0: no limit) or, for `auto`, a function of the
    number of values the update holds.
    """
    if set(update) != set(expected):
        extra, missing = sorted(set(update) - set(expected)), sorted(set(expected) - set(update))
        return (f"unexpected tensor names (extra {extra[:2]}{'...' if len(extra) > 2 else ''}, "
                f"missing {missing[:2]}{'...' if len(missing) > 2 else ''})")
    for key, value in update.items():
        if value.shape != expected[key].shape:
            return f"{key} has shape {value.shape}, expected {expected[key].shape}"
        if value.dtype != expected[key].dtype:
            return f"{key} has dtype {value.dtype}, expected {expected[key].dtype}"
        if not np.all(np.isfinite(value)):
            return f"{key} holds NaN or Inf"
    if callable(max_norm):
        limit = max_norm(sum(v.size for v in update.values()))
        text = f"auto ({limit:.4g})"
    else:
        limit, text = max_norm or math.inf, f"{max_norm:g}"
    if limit < math.inf and (norm := update_norm(update, expected)) > limit:
        return f"update norm {norm:.4g} exceeds max-update-norm {text}"
    return None


def decode(reply: Reply, expected: Expected) -> None:
    """An int8-delta update becomes the adapter it encodes; one that does not decode
    keeps its raw tensors and its `codec-error`, and validation rejects it."""
    values, scales = codec.unpack(reply.arrays)
    try:
        reply.arrays = codec.decode(values, scales, expected(values))
    except Exception as exc:  # noqa: BLE001 - a client's bytes must not stop the server
        reply.arrays = values
        reply.info[CODEC_ERROR] = str(exc) if isinstance(exc, codec.CodecError) \
            else f"malformed update ({type(exc).__name__}: {exc})"


def accept_updates(replies: list[Reply], failures: list[dict[str, Any]], expected: Expected,
                   rnd: int, max_norm: float | AutoNorm = 0.0,
                   min_replies: int = 1) -> list[Reply]:
    """The updates that may be aggregated, decoded. Each rejected one is logged, listed in
    `failures` with its node and reason, and its status says why; TooFewUpdates when
    fewer than `min_replies` remain. `max_norm`: `max_update_norm(config)`."""
    for reply in replies:
        decode(reply, expected)
    accepted = []
    for reply in replies:
        limit = partial(max_norm, reply.metrics) if isinstance(max_norm, AutoNorm) else max_norm
        problem = reply.info.get(CODEC_ERROR) or \
            problems_with(reply.arrays, expected(reply.arrays), limit)
        if problem:
            log.warning("round %d: rejected update from node %s (%s): %s", rnd, reply.node,
                        reply.client, problem)
            failures.append({"node": reply.node, "client": reply.client, "reason": problem})
            reply.info[STATUS] = status_text(Status.REJECTED, problem)
        else:
            accepted.append(reply)
    if len(accepted) < min_replies:
        reasons = "; ".join(f"node {f['node']}: {f['reason']}" for f in failures) \
            or "no client was sampled"
        raise TooFewUpdates(f"round {rnd}: {len(accepted)} usable updates, fewer than "
                            f"min-replies={min_replies} ({reasons})")
    return accepted
