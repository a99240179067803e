"""The Flower ServerApp: rounds of train + federated evaluation over LoRA adapters."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.serverapp import Grid, ServerApp

from server.config import validate
from server.records import (
    append_metrics,
    new_run_dir,
    save_adapter,
    summary_line,
    write_json,
)
from server.strategies import Arrays, fedavg, problems_with

log = logging.getLogger("fedslm")
NODE_WAIT_SECONDS = 600.0


class FederationError(RuntimeError):
    """The federation cannot go on (no client replied, too few clients)."""


@dataclass
class Reply:
    node: int
    client: str
    metrics: dict[str, float]
    info: dict[str, str]
    arrays: Arrays = field(default_factory=dict)
    bytes_up: int = 0


def payload_bytes(record: ArrayRecord) -> int:
    return sum(len(array.data) for array in record.values())


def _send(grid: Grid, nodes: list[int], kind: str, record: ArrayRecord, config: ConfigRecord,
          rnd: int, timeout: float) -> tuple[list[Reply], list[dict[str, Any]]]:
    config = ConfigRecord({**dict(config), "server-round": rnd})
    messages = [
        Message(RecordDict({"arrays": record, "config": config}), dst_node_id=node,
                message_type=kind, group_id=str(rnd))
        for node in nodes
    ]
    replies, failures = [], []
    answered = set()
    for msg in grid.send_and_receive(messages, timeout=timeout):
        node = msg.metadata.src_node_id
        answered.add(node)
        if msg.has_error():
            failures.append({"node": node, "reason": msg.error.reason})
            continue
        content = msg.content
        arrays = content.array_records.get("arrays")
        replies.append(Reply(
            node=node,
            client=str(content["info"]["client"]),
            metrics=dict(content["metrics"]),
            info=dict(content["info"]),
            arrays={k: v.numpy() for k, v in arrays.items()} if arrays else {},
            bytes_up=payload_bytes(arrays) if arrays else 0,
        ))
    failures += [{"node": n, "reason": f"no reply within {timeout:g}s"}
                 for n in nodes if n not in answered]
    for failure in failures:
        log.warning("round %d %s: node %s failed: %s", rnd, kind, failure["node"],
                    failure["reason"])
    return replies, failures


def _wait_for_nodes(grid: Grid, count: int, timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    while True:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= count:
            return nodes[:count]
        if time.monotonic() > deadline:
            raise FederationError(f"only {len(nodes)} of {count} clients connected in {timeout:g}s")
        time.sleep(1.0)


def _evaluation(replies: list[Reply]) -> dict[str, float]:
    tokens = sum(r.metrics["eval-tokens"] for r in replies)
    loss = sum(r.metrics["eval-loss-sum"] for r in replies) / tokens if tokens else math.nan
    return {
        "eval_loss": loss,
        "perplexity": math.exp(loss) if loss < 700 else math.inf,
        "token_accuracy": sum(r.metrics["eval-correct"] for r in replies) / tokens if tokens else 0,
    }


def _epsilon(value: float) -> float:
    return math.inf if value < 0 else value


def _client_rows(trained: list[Reply], evaluated: list[Reply]) -> list[dict[str, Any]]:
    by_client = {r.client: r for r in evaluated}
    rows = []
    for r in sorted(trained or evaluated, key=lambda r: r.client):
        ev = by_client.get(r.client)
        m = r.metrics if trained else {}
        e = ev.metrics if ev else {}
        rows.append({
            "client": r.client,
            "epsilon": _epsilon(m.get("epsilon", e.get("epsilon", 0.0))),
            "delta": m.get("delta", e.get("delta")),
            "num_examples": int(m.get("num-examples", 0)),
            "train_seconds": m.get("train-seconds", 0.0),
            "train_loss": m.get("train-loss"),
            "noise_multiplier": m.get("noise-multiplier"),
            "sample_rate": m.get("sample-rate"),
            "steps": int(m.get("steps", 0)),
            "energy_j": m.get("energy-j", 0.0) + e.get("energy-j", 0.0),
            "energy_method": (r.info if trained else ev.info)["energy-method"],
            "peak_rss_mb": max(m.get("peak-rss-mb", 0.0), e.get("peak-rss-mb", 0.0)),
            "bytes_up": r.bytes_up if trained else 0,
            "eval_loss": e["eval-loss-sum"] / e["eval-tokens"] if e.get("eval-tokens") else None,
            "quantization": r.info["quantization"],
        })
    return rows


def run_federation(grid: Grid, config: dict[str, Any], run_dir: Path,
                   echo: Callable[[str], None] = print) -> Path:
    """Round 0 evaluation, then `num-server-rounds` of train + evaluate; writes run_dir."""
    config = {**config, "run-id": run_dir.name, "run-dir": str(run_dir)}
    write_json(run_dir / "config.json", config)
    rounds, timeout = config["num-server-rounds"], config["round-timeout"]
    client_config = ConfigRecord({**{k: v for k, v in config.items() if k != "run-dir"},
                                  "state-root": str(run_dir / "clients")})
    nodes = _wait_for_nodes(grid, config["num-clients"], NODE_WAIT_SECONDS)
    global_arrays: Arrays = {}  # round 1 starts from the clients' shared seeded init
    epsilon_by_client: dict[str, float] = {}
    adapter_config = ""
    for rnd in range(rounds + 1):
        start = time.perf_counter()
        record = ArrayRecord({k: Array(v) for k, v in global_arrays.items()})
        down = payload_bytes(record) * len(nodes)
        trained, failures = [], []
        if rnd > 0:
            trained, failures = _send(grid, nodes, MessageType.TRAIN, record, client_config,
                                      rnd, timeout)
            trained = _accept(trained, failures, global_arrays or None, rnd)
            global_arrays = fedavg([(r.arrays, r.metrics["num-examples"]) for r in trained])
            adapter_config = trained[0].info["adapter-config"]
            save_adapter(run_dir / "adapter", global_arrays, adapter_config)
            record = ArrayRecord({k: Array(v) for k, v in global_arrays.items()})
            down += payload_bytes(record) * len(nodes)
        evaluated, eval_failures = _send(grid, nodes, MessageType.EVALUATE, record,
                                         client_config, rnd, timeout)
        if not evaluated:
            raise FederationError(f"round {rnd}: no client could evaluate: "
                                  f"{eval_failures[0]['reason'] if eval_failures else '?'}")
        rows = _client_rows(trained, evaluated)
        for row in rows:
            epsilon_by_client[row["client"]] = row["epsilon"]
        line = {
            "round": rnd,
            **_evaluation(evaluated),
            "epsilon": max(epsilon_by_client.values()) if config["dp"] else math.inf,
            "delta": config["delta"],
            "round_seconds": time.perf_counter() - start,
            "bytes_up": sum(r.bytes_up for r in trained),
            "bytes_down": down,
            "clients": rows,
            "failures": failures + eval_failures,
        }
        append_metrics(run_dir, line)
        echo(summary_line(line, rounds))
    return run_dir


def _accept(replies: list[Reply], failures: list[dict[str, Any]], expected: Arrays | None,
            rnd: int) -> list[Reply]:
    accepted = []
    for reply in replies:
        problem = problems_with(reply.arrays, expected)
        if problem:
            log.warning("round %d: rejected update from %s: %s", rnd, reply.client, problem)
            failures.append({"node": reply.node, "client": reply.client, "reason": problem})
        else:
            accepted.append(reply)
    if not accepted:
        reason = failures[0]["reason"] if failures else "no client was sampled"
        raise FederationError(f"round {rnd}: no usable update: {reason}")
    return accepted


def make_server_app(config: dict[str, Any], run_dir: Path) -> ServerApp:
    """A ServerApp bound to a resolved config (used by `fedslm simulate`)."""
    server_app = ServerApp()

    @server_app.main()
    def _main(grid: Grid, context: Context) -> None:
        run_federation(grid, config, run_dir)

    return server_app


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Entry point for `flwr run .`: the config comes from the run config."""
    flwr_log = logging.getLogger("flwr")  # Flower streams its own logger to `flwr run`
    config = validate(dict(context.run_config))
    run_dir = new_run_dir(config["out"])
    flwr_log.info("fedslm run directory: %s", run_dir)
    run_federation(grid, config, run_dir, echo=flwr_log.info)
    flwr_log.info("fedslm run directory: %s", run_dir)


