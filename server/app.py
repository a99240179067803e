"""The Flower ServerApp: rounds of train + federated evaluation over LoRA adapters."""

from __future__ import annotations

import logging
import math
import random
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.serverapp import Grid, ServerApp

from client import codec
from privacy.accountant import epsilon
from privacy.ledger import Entry, Ledger
from server.central_dp import dp_fedavg
from server.config import resume_config, validate
from server.records import (
    append_metrics,
    load_checkpoint,
    new_run_dir,
    save_adapter,
    save_checkpoint,
    summary_line,
    write_json,
)
from server.strategies import (
    Arrays,
    cut_to_rank,
    fedavg,
    hetlora,
    problems_with,
    rank_of,
    sent_part,
)

log = logging.getLogger("fedslm")


class FederationError(RuntimeError):
    """The federation cannot go on (no client replied, too few clients)."""


class TooFewUpdates(FederationError):
    """A round has fewer usable updates than `min-replies`: it is skipped."""


@dataclass(eq=False)  # identity: replies hold numpy arrays
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
    """The connected nodes (at most `count`), once at least `count` are there."""
    deadline = time.monotonic() + timeout
    while True:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= count:
            return nodes
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


def _client_row(status: str, r: Reply, ev: Reply | None) -> dict[str, Any]:
    m = r.metrics if r is not ev else {}
    e = ev.metrics if ev else {}
    return {
        "client": r.client,
        "status": status,
        "epsilon": _epsilon(m.get("epsilon", e.get("epsilon", 0.0))),
        "delta": m.get("delta", e.get("delta")),
        "budget_epsilon": m.get("budget-epsilon") or None,
        "num_examples": int(m.get("num-examples", 0)),
        "train_seconds": m.get("train-seconds", 0.0),
        "eval_seconds": e.get("eval-seconds", 0.0),
        "noise_multiplier": m.get("noise-multiplier"),
        "sample_rate": m.get("sample-rate"),
        "steps": int(m.get("steps", 0)),
        "energy_j": m.get("energy-j", 0.0) + e.get("energy-j", 0.0),
        "energy_method": r.info.get("energy-method") or (ev.info["energy-method"] if ev else ""),
        "peak_rss_mb": max(m.get("peak-rss-mb", 0.0), e.get("peak-rss-mb", 0.0)),
        "bytes_up": r.bytes_up,
        "eval_loss": e["eval-loss-sum"] / e["eval-tokens"] if e.get("eval-tokens") else None,
        "quantization": r.info["quantization"],
    }


def _client_rows(trained: list[Reply], refused: list[Reply],
                 evaluated: list[Reply]) -> list[dict[str, Any]]:
    by_client = {r.client: r for r in evaluated}
    rows = [_client_row("trained", r, by_client.get(r.client)) for r in trained]
    rows += [_client_row(r.info["status"], r, by_client.get(r.client)) for r in refused]
    if not trained and not refused:  # round 0: evaluation only
        rows = [_client_row("evaluated", r, r) for r in evaluated]
    return sorted(rows, key=lambda row: row["client"])


def _initial_adapter(evaluated: list[Reply]) -> tuple[Arrays, str]:
    """The clients' shared seeded adapter, sent back with the round-0 evaluation: the
    largest rank's (HetLoRA); every other must be its first components."""
    first = max(evaluated, key=lambda r: rank_of(r.arrays))
    for reply in evaluated:
        expected = cut_to_rank(first.arrays, rank_of(reply.arrays))
        if set(reply.arrays) != set(expected) or any(
                not np.array_equal(reply.arrays[k], expected[k]) for k in expected):
            raise FederationError(
                f"clients {first.client} and {reply.client} start from different "
                "adapters (different model, LoRA settings or seed?)")
    return first.arrays, first.info["adapter-config"]


def sample_clients(nodes: list[int], want: int, total: int, poisson: bool,
                   rng: random.Random) -> tuple[list[int], float]:
    """A round's trainers and the rate q they were sampled at. `want` = 0 asks every
    node (q = 1: no sampling to amplify privacy, even when some nodes are gone). Poisson
    sampling (each node with probability q = want / total, what the central-DP
    accountant models) when `poisson`; otherwise a uniform sample of `want`."""
    if not want or (want >= len(nodes) and not poisson):
        return nodes, 1.0
    if poisson:
        q = min(1.0, want / total)
        return [n for n in nodes if rng.random() < q], q
    return sorted(rng.sample(nodes, want)), want / total


class CentralDP:
    """The server's user-level DP mechanism and its ledger (see server/central_dp.py)."""

    def __init__(self, config: dict[str, Any], run_dir: Path, num_clients: int) -> None:
        self.clip = config["central-clip-norm"]
        self.noise = config["central-noise-multiplier"]
        self.delta = config["delta"]
        self.run_id = run_dir.name
        self.ledger = Ledger(run_dir / "server" / "ledger.sqlite")
        self.num_clients = num_clients
        self.seed = config["seed"] if config["reproducible"] else None

    def aggregate(self, rnd: int, reference: Arrays, updates: list[Reply],
                  q: float) -> tuple[Arrays, float]:
        """q: the rate at which clients were sampled this round (1: all asked)."""
        history = self.ledger.history() + [(self.noise, q, 1)]
        eps = epsilon(history, self.delta, "rdp")
        self.ledger.append(Entry(  # charged before the aggregate is released
            run_id=self.run_id, round=rnd, client="server:user-level", dataset="federation",
            noise_multiplier=self.noise, sample_rate=q, steps=1, delta=self.delta,
            accountant="rdp", epsilon=eps, time=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        ))
        rng = np.random.default_rng(  # per round, so that a resumed run draws the same
            [self.seed, rnd] if self.seed is not None else secrets.randbits(128))
        arrays, norms = dp_fedavg(reference, [r.arrays for r in updates], self.clip,
                                  self.noise, q * self.num_clients, rng)
        log.info("round %d: central DP, update norms %s, user-level epsilon %.3f", rnd,
                 [round(n, 3) for n in norms], eps)
        return arrays, eps


class Federation:
    """One run's server-side state; `run()` does round 0 and then every training round.

    After each round it checkpoints the global adapter and its own state, so that a
    run started with `resume` = its run directory goes on after the last completed round.
    """

    def __init__(self, grid: Grid, config: dict[str, Any], run_dir: Path,
                 echo: Callable[[str], None]) -> None:
        self.grid, self.run_dir, self.echo = grid, run_dir, echo
        self.config = {**config, "run-id": run_dir.name, "run-dir": str(run_dir)}
        if not config["resume"]:
            write_json(run_dir / "config.json", {**self.config, "resume": ""})
        root = config["state-root"]
        state_root = Path(root).expanduser().resolve() if root else run_dir / "clients"
        self.client_config = ConfigRecord({
            **{k: v for k, v in self.config.items() if k not in ("run-dir", "resume")},
            "state-root": str(state_root)})
        self.nodes = _wait_for_nodes(grid, config["num-clients"], config["node-wait"])
        self.central = CentralDP(config, run_dir, config["num-clients"]) \
            if config["central-dp"] else None
        self.arrays: Arrays = {}  # round 0 asks for the clients' shared seeded init
        self.adapter_config = ""
        self.epsilon_by_client: dict[str, float] = {}
        self.central_epsilon: float | None = 0.0 if self.central else None
        self.energy_total, self.first_loss = 0.0, math.nan
        self.next_round = 0
        self.skipped: str | None = None  # why this round's training was skipped
        if config["resume"]:
            self._restore()

    def _restore(self) -> None:
        state, self.arrays = load_checkpoint(self.run_dir)
        self.adapter_config = state["adapter_config"]
        self.epsilon_by_client = {k: math.inf if v is None else v
                                  for k, v in state["epsilon_by_client"].items()}
        self.central_epsilon = state["central_epsilon"]
        self.energy_total = state["energy_total"]
        self.first_loss = math.nan if state["first_loss"] is None else state["first_loss"]
        self.next_round = state["round"] + 1
        self.echo(f"resuming run {self.run_dir.name} after round {state['round']}")

    def _checkpoint(self, rnd: int) -> None:
        save_checkpoint(self.run_dir, {
            "round": rnd, "adapter_config": self.adapter_config,
            "epsilon_by_client": self.epsilon_by_client, "central_epsilon": self.central_epsilon,
            "energy_total": self.energy_total, "first_loss": self.first_loss,
        }, self.arrays)

    def _connected(self, rnd: int) -> list[int]:
        """This round's clients: the connected nodes, at most `num-clients` of them."""
        want, least = self.config["num-clients"], self.config["min-replies"]
        nodes = sorted(self.grid.get_node_ids())
        if len(nodes) < least:
            log.warning("round %d: %d clients connected, waiting for min-replies=%d", rnd,
                        len(nodes), least)
            nodes = _wait_for_nodes(self.grid, least, self.config["node-wait"])
        nodes = nodes[:want]
        if nodes != self.nodes:
            log.warning("round %d: %d of %d clients connected", rnd, len(nodes), want)
        self.nodes = nodes
        return nodes

    def _sample(self, rnd: int, nodes: list[int]) -> tuple[list[int], float]:
        seed = f"{self.config['seed']}|{rnd}"
        rng = random.Random(seed) if self.config["reproducible"] else random.SystemRandom()
        return sample_clients(nodes, self.config["clients-per-round"],
                              self.config["num-clients"], self.central is not None, rng)

    def _evaluators(self, rnd: int) -> list[int]:
        nodes = self._connected(rnd)
        return nodes[:self.config["eval-clients"]] if self.config["eval-clients"] else nodes

    def _send(self, kind: str, rnd: int,
              nodes: list[int]) -> tuple[list[Reply], list[dict[str, Any]], int]:
        record = ArrayRecord({k: Array(v) for k, v in
                              sent_part(self.arrays, self.config["strategy"]).items()})
        replies, failures = _send(self.grid, nodes, kind, record, self.client_config, rnd,
                                  self.config["round-timeout"])
        return replies, failures, payload_bytes(record) * len(nodes)

    def train(self, rnd: int) -> tuple[list[Reply], list[Reply], list[dict[str, Any]], int]:
        """(trained, refused, failures, bytes down); the global adapter is updated."""
        nodes, q = self._sample(rnd, self._connected(rnd))
        if not nodes:  # a Poisson draw of no client: the noised aggregate is still released
            log.warning("round %d: no client sampled", rnd)
            self.arrays, self.central_epsilon = self.central.aggregate(rnd, self.arrays, [], q)
            return [], [], [], 0
        replies, failures, down = self._send(MessageType.TRAIN, rnd, nodes)
        refused = [r for r in replies if r.info.get("status", "ok") != "ok"]
        for r in refused:
            log.warning("round %d: %s did not train: %s", rnd, r.client, r.info["status"])
        if refused and len(refused) == len(replies) and not failures:
            return [], refused, failures, down
        updates = [r for r in replies if r not in refused]
        for r in updates:
            self._decode(r)
        try:
            trained = _accept(updates, failures, self._expected, rnd,
                              self.config["max-update-norm"], self.config["min-replies"])
        except TooFewUpdates as exc:  # the global adapter stays as it was
            log.warning("%s; round skipped", exc)
            self.skipped = str(exc)
            for r in updates:
                if r.info["status"] == "ok":
                    r.info["status"] = "unused: round skipped"
            return [], refused + updates, failures, down
        refused += [r for r in updates if r not in trained]  # rejected: trained, not used
        self.arrays = self._aggregate(rnd, trained, q)
        save_adapter(self.run_dir / "adapter", self.arrays, self.adapter_config)
        return trained, refused, failures, down

    def _decode(self, reply: Reply) -> None:
        """An int8-delta update becomes the adapter it encodes (client/codec.py); one
        that does not decode keeps its raw tensors, which validation then rejects."""
        values, scales = codec.unpack(reply.arrays)
        try:
            reply.arrays = codec.decode(values, scales, self._expected(values))
        except Exception as exc:  # noqa: BLE001 - a client's bytes must not stop the server
            reply.arrays = values
            reply.info["codec-error"] = str(exc) if isinstance(exc, codec.CodecError) \
                else f"malformed update ({type(exc).__name__}: {exc})"

    def _expected(self, update: Arrays) -> Arrays:
        """What a valid update looks like: the adapter sent (HetLoRA: cut to its rank)."""
        sent = sent_part(self.arrays, self.config["strategy"])
        return cut_to_rank(sent, rank_of(update)) if self.config["strategy"] == "hetlora" \
            else sent

    def _aggregate(self, rnd: int, trained: list[Reply], q: float) -> Arrays:
        strategy = self.config["strategy"]
        if strategy == "hetlora":
            return hetlora([(r.arrays, r.metrics["num-examples"]) for r in trained],
                           rank_of(self.arrays))
        sent = sent_part(self.arrays, strategy)
        if self.central:
            new, self.central_epsilon = self.central.aggregate(rnd, sent, trained, q)
        else:
            new = fedavg([(r.arrays, r.metrics["num-examples"]) for r in trained])
        return {**self.arrays, **new}  # FFA-LoRA: A stays the shared start

    def evaluate(self, rnd: int) -> tuple[list[Reply], list[dict[str, Any]], int]:
        evaluated, failures, down = self._send(MessageType.EVALUATE, rnd, self._evaluators(rnd))
        if not evaluated:
            reason = failures[0]["reason"] if failures else "?"
            raise FederationError(f"round {rnd}: no client could evaluate: {reason}")
        if rnd == 0:
            self.arrays, self.adapter_config = _initial_adapter(evaluated)
        return evaluated, failures, down

    def record(self, rnd: int, seconds: float, trained: list[Reply], refused: list[Reply],
               evaluated: list[Reply], failures: list[dict[str, Any]], down: int) -> None:
        rows = _client_rows(trained, refused, evaluated)
        self.epsilon_by_client.update({row["client"]: row["epsilon"] for row in rows})
        line = {
            "round": rnd,
            **_evaluation(evaluated),
            "epsilon": max(self.epsilon_by_client.values()),
            "delta": self.config["delta"],
            "central_epsilon": self.central_epsilon,
            "round_seconds": seconds,
            "bytes_up": sum(r.bytes_up for r in trained + refused + evaluated),
            "bytes_down": down,
            "clients": rows,
            "dropouts": [{"client": r.client, "reason": r.info["status"]} for r in refused
                         if r.info["status"].startswith("refused")],
            "failures": failures,
            "skipped": self.skipped,
        }
        self.skipped = None
        if rnd == 0:
            self.first_loss = line["eval_loss"]
        self.energy_total = _add_costs(line, self.config["batch-size"], len(self.nodes),
                                       self.energy_total, self.first_loss)
        append_metrics(self.run_dir, line)
        self._checkpoint(rnd)
        self.echo(summary_line(line, self.config["num-server-rounds"]))

    def run(self) -> None:
        for rnd in range(self.next_round, self.config["num-server-rounds"] + 1):
            start = time.perf_counter()
            trained, refused, failures, down = [], [], [], 0
            if rnd > 0:
                trained, refused, failures, down = self.train(rnd)
                if not trained and refused and self.skipped is None and all(
                        r.info["status"].startswith("refused") for r in refused):
                    self.echo(f"round {rnd}: every client's privacy budget is spent; stopping")
                    break
            evaluated, eval_failures, eval_down = self.evaluate(rnd)
            self.record(rnd, time.perf_counter() - start, trained, refused, evaluated,
                        failures + eval_failures, down + eval_down)
        if self.central:
            self.central.ledger.close()


def run_federation(grid: Grid, config: dict[str, Any], run_dir: Path,
                   echo: Callable[[str], None] = print) -> Path:
    """Round 0 evaluation, then `num-server-rounds` of train + evaluate; writes run_dir."""
    Federation(grid, config, run_dir, echo).run()
    return run_dir


def _add_costs(line: dict[str, Any], batch_size: int, nodes: int, energy_before: float,
               first_loss: float) -> float:
    """Per-client throughput and downlink, the round's energy, and the efficiency figure
    `loss_drop_per_kj`: (round-0 held-out loss - this round's) / kJ all clients spent
    since round 0 (round 0 included). Returns the energy spent so far."""
    for row in line["clients"]:
        row["bytes_down"] = line["bytes_down"] // max(nodes, 1)
        seconds = row["train_seconds"]
        expected = row["steps"] * batch_size  # expected samples, not the private draws
        row["samples_per_second"] = expected / seconds if seconds else None
    line["energy_j"] = sum(row["energy_j"] for row in line["clients"])
    spent = energy_before + line["energy_j"]
    line["loss_drop_per_kj"] = (first_loss - line["eval_loss"]) / (spent / 1e3) \
        if line["round"] and spent else None
    return spent


def _accept(replies: list[Reply], failures: list[dict[str, Any]],
            expected: Callable[[Arrays], Arrays], rnd: int, max_norm: float = 0.0,
            min_replies: int = 1) -> list[Reply]:
    """The updates that may be aggregated; each rejected one is logged and listed in
    `failures` with its node and reason. Fewer than `min_replies` ends the run."""
    accepted = []
    for reply in replies:
        problem = reply.info.get("codec-error") or \
            problems_with(reply.arrays, expected(reply.arrays), max_norm)
        if problem:
            log.warning("round %d: rejected update from node %s (%s): %s", rnd, reply.node,
                        reply.client, problem)
            failures.append({"node": reply.node, "client": reply.client, "reason": problem})
            reply.info["status"] = f"rejected: {problem}"
        else:
            accepted.append(reply)
    if len(accepted) < min_replies:
        reasons = "; ".join(f"node {f['node']}: {f['reason']}" for f in failures) \
            or "no client was sampled"
        raise TooFewUpdates(f"round {rnd}: {len(accepted)} usable updates, fewer than "
                            f"min-replies={min_replies} ({reasons})")
    return accepted


def make_server_app(config: dict[str, Any], run_dir: Path,
                    echo: Callable[[str], None] = print) -> ServerApp:
    """A ServerApp bound to a resolved config (used by `fedslm simulate`)."""
    server_app = ServerApp()

    @server_app.main()
    def _main(grid: Grid, context: Context) -> None:
        run_federation(grid, config, run_dir, echo)

    return server_app


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Entry point for `flwr run .`: the config comes from the run config; with
    `resume` = a run directory, that run's own config and checkpoint."""
    flwr_log = logging.getLogger("flwr")  # Flower streams its own logger to `flwr run`
    config = validate(dict(context.run_config))
    if config["resume"]:
        run_dir = Path(config["resume"])
        config = resume_config(run_dir)
    else:
        run_dir = new_run_dir(config["out"])
    flwr_log.info("fedslm run directory: %s", run_dir)
    run_federation(grid, config, run_dir, echo=flwr_log.info)
    flwr_log.info("fedslm run directory: %s", run_dir)
