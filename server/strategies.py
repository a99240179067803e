"""Aggregation of adapter updates (numpy only: the server needs no training stack)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

Arrays = dict[str, np.ndarray]


def fedavg(updates: Sequence[tuple[Arrays, float]]) -> Arrays:
    """Weighted mean of each tensor (weights: the clients' example counts)."""
    if not updates:
        raise ValueError("no updates to aggregate")
    keys = set(updates[0][0])
    if any(set(arrays) != keys for arrays, _ in updates):
        raise ValueError("updates disagree on their tensor names")
    total = float(sum(weight for _, weight in updates))
    if total <= 0:
        raise ValueError("aggregation weights sum to zero")
    return {
        key: sum((arrays[key].astype(np.float64) * (w / total) for arrays, w in updates))
        .astype(np.float32)
        for key in sorted(keys)
    }


def update_norm(update: Arrays, reference: Arrays) -> float:
    """L2 norm of (update - reference) over all tensors."""
    return float(np.sqrt(sum(
        np.sum((update[k].astype(np.float64) - reference[k].astype(np.float64)) ** 2)
        for k in reference)))


def problems_with(update: Arrays, expected: Arrays, max_norm: float = 0.0) -> str | None:
    """Why an update cannot be aggregated, or None when it can.

    `expected` is the global adapter the client was sent: the update must have its
    tensor names, shapes and dtypes, hold only finite values, and (when `max_norm`
    > 0) differ from it by at most `max_norm` in L2 norm.
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
    if max_norm > 0:
        norm = update_norm(update, expected)
        if norm > max_norm:
            return f"update norm {norm:.4g} exceeds max-update-norm {max_norm:g}"
    return None
