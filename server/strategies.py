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


def problems_with(update: Arrays, expected: Arrays | None) -> str | None:
    """Why an update cannot be aggregated, or None when it can."""
    if expected is not None:
        if set(update) != set(expected):
            return f"unexpected tensor names ({len(set(update) ^ set(expected))} differ)"
        for key, value in update.items():
            if value.shape != expected[key].shape:
                return f"{key} has shape {value.shape}, expected {expected[key].shape}"
    for key, value in update.items():
        if not np.issubdtype(value.dtype, np.floating):
            return f"{key} has dtype {value.dtype}"
        if not np.all(np.isfinite(value)):
            return f"{key} holds NaN or Inf"
    return None
