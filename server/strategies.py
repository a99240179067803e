"""Aggregation of LoRA adapter updates (numpy only: the server needs no training stack).

- `fedavg`: the weighted mean of every A and B (the baseline). The mean of the factors
  is not the mean of the updates B·A they stand for; local steps are few, so it works.
- `ffa-lora` (Sun et al., ICLR 2024): A is frozen at the shared seeded start on every
  client and never sent; only B is trained, sent and averaged. Since A is the same
  everywhere, mean(B_k)·A = mean(B_k·A): the aggregate is the exact mean update, and DP
  noise enters only B (fewer noised coordinates per clipped gradient).
- `hetlora` (Cho et al., 2023): clients train the rank their device affords; each
  update is zero-padded to the global rank and rank component i is averaged over the
  clients that have it (not exact: it averages factors, like fedavg).
Weights are the clients' training-example counts. Under DP each client's noise is in
its own update already (sample-level DP); the server adds none unless central-dp.
"""

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


def hetlora(updates: Sequence[tuple[Arrays, float]], rank: int) -> Arrays:
    """Adapters of different ranks into one of rank `rank`: component i (row i of each A,
    column i of each B) is the weighted mean over the clients whose rank exceeds i;
    components no client has stay zero. With equal ranks this is `fedavg`."""
    if not updates:
        raise ValueError("no updates to aggregate")
    out = {}
    for key in sorted(updates[0][0]):
        is_a = is_lora_a(key)
        first = updates[0][0][key]
        shape = (rank, first.shape[1]) if is_a else (first.shape[0], rank)
        total, weights = np.zeros(shape), np.zeros(rank)
        for arrays, w in updates:
            value = arrays[key].astype(np.float64)
            r = min(value.shape[0] if is_a else value.shape[1], rank)
            if is_a:
                total[:r] += w * value[:r]
            else:
                total[:, :r] += w * value[:, :r]
            weights[:r] += w
        scale = np.divide(1.0, weights, out=np.zeros(rank), where=weights > 0)
        out[key] = (total * (scale[:, None] if is_a else scale[None, :])).astype(np.float32)
    return out


def is_lora_a(key: str) -> bool:
    return ".lora_A." in key


def sent_part(arrays: Arrays, strategy: str) -> Arrays:
    """What travels between server and clients: everything, or only B under FFA-LoRA."""
    if strategy == "ffa-lora":
        return {k: v for k, v in arrays.items() if not is_lora_a(k)}
    return arrays


def rank_of(arrays: Arrays) -> int:
    return next((v.shape[0] for k, v in arrays.items() if is_lora_a(k)), 0)


def cut_to_rank(arrays: Arrays, rank: int) -> Arrays:
    """The first `rank` components: rows of each A (r x in), columns of each B (out x r)."""
    return {k: (v[:rank] if is_lora_a(k) else v[:, :rank]) for k, v in arrays.items()}


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
