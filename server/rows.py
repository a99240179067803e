"""A round's line in metrics.jsonl: its evaluation, privacy, bytes, clients and costs."""

from __future__ import annotations

import math
from typing import Any

from contracts import wire
from contracts.wire import STATUS, Status, epsilon_from_wire
from server.replies import Reply


def client_row(status: str, r: Reply, ev: Reply | None) -> dict[str, Any]:
    """One client's row: its training reply `r` (round 0: its evaluation) and its
    evaluation reply `ev`, if it evaluated. Timings, energy, memory and held-out sums are
    None where the data owner keeps them on the device (contracts/wire.py RELEASES)."""
    m = r.metrics if r is not ev else {}
    e = ev.metrics if ev else {}
    return {
        "client": r.client,
        "node": r.node,
        "status": status,
        "epsilon": epsilon_from_wire(m.get(wire.EPSILON, e.get(wire.EPSILON, 0.0))),
        "delta": m.get(wire.DELTA, e.get(wire.DELTA)),
        "budget_epsilon": m.get(wire.BUDGET_EPSILON) or None,
        "num_examples": int(m.get(wire.NUM_EXAMPLES, 0)),
        "train_seconds": m.get(wire.TRAIN_SECONDS),
        "eval_seconds": e.get(wire.EVAL_SECONDS),
        "noise_multiplier": m.get(wire.NOISE_MULTIPLIER),
        "sample_rate": m.get(wire.SAMPLE_RATE),
        "steps": int(m.get(wire.STEPS, 0)),
        "energy_j": _total(m.get(wire.ENERGY_J), e.get(wire.ENERGY_J)),
        "energy_method": r.info.get(wire.ENERGY_METHOD)
        or (ev.info[wire.ENERGY_METHOD] if ev else ""),
        "peak_rss_mb": max((v for v in (m.get(wire.PEAK_RSS_MB), e.get(wire.PEAK_RSS_MB))
                            if v is not None), default=None),
        "bytes_up": r.bytes_up,
        "eval_loss": e[wire.EVAL_LOSS_SUM] / e[wire.EVAL_TOKENS] if e.get(wire.EVAL_TOKENS)
        else None,
        "quantization": r.info[wire.QUANTIZATION],
        "stats_released": any(k in m or k in e for k in (wire.ENERGY_J, wire.EVAL_TOKENS)),
    }


def _total(*values: float | None) -> float | None:
    given = [v for v in values if v is not None]
    return sum(given) if given else None


def client_rows(trained: list[Reply], refused: list[Reply],
                evaluated: list[Reply]) -> list[dict[str, Any]]:
    """Every client's row, its evaluation paired by node (a name is only what a client
    claims); `refused` holds every reply not used (its status says why)."""
    by_node = {r.node: r for r in evaluated}
    rows = [client_row(Status.TRAINED.value, r, by_node.get(r.node)) for r in trained]
    rows += [client_row(r.info[STATUS], r, by_node.get(r.node)) for r in refused]
    if not trained and not refused:  # round 0: evaluation only
        rows = [client_row(Status.EVALUATED.value, r, r) for r in evaluated]
    return sorted(rows, key=lambda row: row["client"])


def dropouts(refused: list[Reply]) -> list[dict[str, str]]:
    """The clients that did not train (their privacy budget did not allow it)."""
    return [{"client": r.client, "reason": r.info[STATUS]} for r in refused
            if r.info[STATUS].startswith(Status.REFUSED)]


def add_costs(line: dict[str, Any], batch_size: int, nodes: int, energy_before: float,
              first_loss: float) -> float:
    """Per-client throughput and downlink, the round's energy, and the efficiency figure
    `loss_drop_per_kj`: (round-0 held-out loss - this round's) / kJ all clients spent
    since round 0 (round 0 included). Energy counts the clients that released it only.
    Returns the energy spent so far."""
    for row in line["clients"]:
        row["bytes_down"] = line["bytes_down"] // max(nodes, 1)
        seconds = row["train_seconds"]
        expected = row["steps"] * batch_size  # expected samples, not the private draws
        row["samples_per_second"] = expected / seconds if seconds else None
    line["energy_j"] = _total(*(row["energy_j"] for row in line["clients"]))
    spent = energy_before + (line["energy_j"] or 0.0)
    loss = line.get("eval_loss")
    line["loss_drop_per_kj"] = (first_loss - loss) / (spent / 1e3) \
        if line["round"] and spent and loss is not None and math.isfinite(loss) else None
    return spent
