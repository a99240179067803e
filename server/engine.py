"""The round engine: round 0 evaluates the clients' shared initial adapter, then each
round trains (on the sampled nodes) and evaluates; after each round a line goes to
metrics.jsonl and a checkpoint is written, so that a run started with `resume` = its
run directory goes on after the last completed round.

The engine drives a strategy's configure_*/aggregate_* (server/strategies.py says why
not Flower's `Strategy.start()`); between them it exchanges the messages, decides what
each reply was (refused, rejected, used), skips a round's training with too few usable
updates, and stops when every client's privacy budget is spent.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ConfigRecord
from flwr.serverapp import Grid

from contracts.adapter import Arrays, cut_to_rank, rank_of
from contracts.config import for_clients
from contracts.rundir import (
    ADAPTER,
    LEDGERS,
    CheckpointError,
    append_metrics,
    client_state_root,
    load_checkpoint,
    save_adapter,
    save_checkpoint,
    write_config,
)
from contracts.wire import ADAPTER_CONFIG, RUN_ID, STATUS, Status, epsilon_from_json, status_text
from server.central_dp import CentralDP
from server.errors import FederationError, TooFewUpdates
from server.nodes import NodePool, Sampling
from server.progress import ProgressMonitor
from server.records import summary_line
from server.replies import Reply, as_update, bytes_down, exchange, from_record, to_record
from server.rows import add_costs, client_rows, dropouts
from server.spend import SpendRecord, registry_path
from server.strategies import STRATEGIES, AdapterStrategy
from server.validation import accept_updates, max_update_norm

__all__ = ["FederationError", "TooFewUpdates", "Federation", "run_federation"]
log = logging.getLogger("fedslm")
RoundStrategy = AdapterStrategy | CentralDP


def make_strategy(config: dict[str, Any], run_dir: Path, nodes: NodePool) -> RoundStrategy:
    strategy = STRATEGIES[config["strategy"]](nodes)
    return CentralDP.from_config(strategy, config, run_dir) if config["central-dp"] \
        else strategy


def client_config(config: dict[str, Any], run_dir: Path) -> ConfigRecord:
    """What every message tells the clients: the client and node keys, the run's id and
    where the clients keep their state (absolute)."""
    state_root = client_state_root(run_dir, config["state-root"])
    return ConfigRecord({**for_clients(config), RUN_ID: run_dir.name,
                         "state-root": str(state_root)})


def initial_adapter(evaluated: list[Reply]) -> tuple[Arrays, str]:
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
    return first.arrays, first.info[ADAPTER_CONFIG]


@dataclass
class RunState:
    """What a checkpoint keeps: the global adapter and the running totals."""

    arrays: Arrays = field(default_factory=dict)  # empty: round 0 asks for the start
    adapter_config: str = ""
    epsilon_by_client: dict[str, float] = field(default_factory=dict)
    central_epsilon: float | None = None
    energy_total: float = 0.0
    first_loss: float = math.nan
    round: int = -1  # the last completed round
    spend: dict[str, Any] = field(default_factory=dict)  # server/spend.py, as JSON

    def save(self, run_dir: Path) -> None:
        save_checkpoint(run_dir, {
            "round": self.round, "adapter_config": self.adapter_config,
            "epsilon_by_client": self.epsilon_by_client, "central_epsilon": self.central_epsilon,
            "energy_total": self.energy_total, "first_loss": self.first_loss,
            "spend": self.spend,
        }, self.arrays)

    @classmethod
    def load(cls, run_dir: Path) -> RunState:
        state, arrays = load_checkpoint(run_dir)
        try:
            return cls._from(state, arrays)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise CheckpointError(f"cannot resume {run_dir}: its checkpoint state lacks or "
                                  f"garbles {exc}") from None

    @classmethod
    def _from(cls, state: dict[str, Any], arrays: Arrays) -> RunState:
        return cls(
            arrays=arrays, adapter_config=state["adapter_config"],
            epsilon_by_client={k: epsilon_from_json(v)
                               for k, v in state["epsilon_by_client"].items()},
            central_epsilon=state["central_epsilon"], energy_total=state["energy_total"],
            first_loss=math.nan if state["first_loss"] is None else state["first_loss"],
            round=state["round"], spend=state.get("spend", {}))


@dataclass
class Training:
    """A round's training: `refused` holds every reply not used, its status says why."""

    trained: list[Reply] = field(default_factory=list)
    refused: list[Reply] = field(default_factory=list)
    failures: list[dict[str, Any]] = field(default_factory=list)
    bytes_down: int = 0
    skipped: str | None = None  # why the round's training was skipped

    @property
    def budget_spent(self) -> bool:
        return not self.trained and bool(self.refused) and self.skipped is None and all(
            r.info[STATUS].startswith(Status.REFUSED) for r in self.refused)


@dataclass
class Evaluation:
    replies: list[Reply]
    metrics: dict[str, Any]  # eval_loss, perplexity, token_accuracy
    failures: list[dict[str, Any]]
    bytes_down: int


class Federation:
    """One run's server side; `run()` does round 0 and then every training round."""

    def __init__(self, grid: Grid, config: dict[str, Any], run_dir: Path,
                 echo: Callable[[str], None], simulation: bool = False) -> None:
        self.grid, self.run_dir, self.echo = grid, run_dir, echo
        # a simulation's client ledgers are on this machine (`fedslm audit` looks for them)
        self.config = {**config, RUN_ID: run_dir.name, "run-dir": str(run_dir),
                       LEDGERS: "local" if simulation else "on-devices"}
        if not config["resume"]:
            write_config(run_dir, {**self.config, "resume": ""})
        self.client_config = client_config(config, run_dir)
        self.nodes = NodePool(Sampling.from_config(config))
        self.nodes.wait_for_all(grid)
        self.strategy = make_strategy(config, run_dir, self.nodes)
        self.state = RunState(central_epsilon=self.strategy.privacy_spent())
        if config["resume"]:
            self.state = RunState.load(run_dir)
            echo(f"resuming run {run_dir.name} after round {self.state.round}")
        # clients whose ledgers live in a simulation's run directory start new ones each run
        registry = not simulation or bool(config["state-root"])
        self.spend = SpendRecord.from_json(
            self.state.spend, simulation, registry_path(run_dir.parent, simulation) if registry
            else None)

    def run(self) -> None:
        self.strategy.summary()
        try:
            for rnd in range(self.state.round + 1, self.config["num-server-rounds"] + 1):
                if not self.round(rnd):
                    break
        finally:
            self.strategy.close()

    def round(self, rnd: int) -> bool:
        """Train (after round 0) and evaluate; False when the run must stop."""
        start = time.perf_counter()
        training = self.train(rnd) if rnd else Training()
        if training.budget_spent:
            self.echo(f"round {rnd}: every client's privacy budget is spent; stopping")
            return False
        evaluation = self.evaluate(rnd)
        self.record(rnd, time.perf_counter() - start, training, evaluation)
        return True

    def train(self, rnd: int) -> Training:
        """The round's training; the global adapter is updated from the usable updates."""
        messages = list(self.strategy.configure_train(
            rnd, to_record(self.state.arrays), self.client_config, self.grid))
        if not messages:  # a Poisson draw of no client: the noised aggregate is still released
            log.warning("round %d: no client sampled", rnd)
            self.aggregate(rnd, [])
            return Training()
        with ProgressMonitor(state_root=client_state_root(self.run_dir, self.config["state-root"]),
                             run_id=self.run_dir.name, rnd=rnd, sent=len(messages),
                             every=self.config["progress-seconds"], echo=self.echo):
            replies, failures = exchange(self.grid, messages, rnd, self.config["round-timeout"])
        out = Training(failures=failures, bytes_down=bytes_down(messages))
        out.refused = [r for r in replies if r.info.get(STATUS, Status.OK) != Status.OK]
        for r in out.refused:
            log.warning("round %d: %s did not train: %s", rnd, r.client, r.info[STATUS])
        if out.refused and len(out.refused) == len(replies) and not failures:
            return out
        updates = [r for r in replies if r not in out.refused]
        try:
            out.trained = accept_updates(updates, failures, self.strategy.expected_update, rnd,
                                         max_update_norm(self.config),
                                         self.config["min-replies"])
        except TooFewUpdates as exc:  # the global adapter stays as it was
            log.warning("%s; round skipped", exc)
            out.skipped = str(exc)
            for r in updates:
                if r.info.get(STATUS, Status.OK) == Status.OK:
                    r.info[STATUS] = status_text(Status.UNUSED, "round skipped")
            out.refused += updates
            return out
        out.refused += [r for r in updates if r not in out.trained]  # rejected: not used
        self.aggregate(rnd, out.trained)
        return out

    def aggregate(self, rnd: int, trained: list[Reply]) -> None:
        arrays, _ = self.strategy.aggregate_train(rnd, [as_update(r) for r in trained])
        if arrays is None:
            return
        self.state.arrays = from_record(arrays)
        self.state.central_epsilon = self.strategy.privacy_spent()
        save_adapter(self.run_dir / ADAPTER, self.state.arrays, self.state.adapter_config)

    def evaluate(self, rnd: int) -> Evaluation:
        messages = list(self.strategy.configure_evaluate(
            rnd, to_record(self.state.arrays), self.client_config, self.grid))
        replies, failures = exchange(self.grid, messages, rnd, self.config["round-timeout"])
        if not replies:
            reason = failures[0]["reason"] if failures else "?"
            raise FederationError(f"round {rnd}: no client could evaluate: {reason}")
        if rnd == 0:
            self.state.arrays, self.state.adapter_config = initial_adapter(replies)
        metrics = self.strategy.aggregate_evaluate(rnd, [r.message for r in replies])
        return Evaluation(replies, dict(metrics or {}), failures, bytes_down(messages))

    def record(self, rnd: int, seconds: float, training: Training,
               evaluation: Evaluation) -> None:
        """The round's line in metrics.jsonl, then the checkpoint, then the summary."""
        state, evaluated = self.state, evaluation.replies
        rows = client_rows(training.trained, training.refused, evaluated)
        # by node: a name is what a client claims, and two may claim one
        state.epsilon_by_client.update({str(row["node"]): row["epsilon"] for row in rows})
        flags = self.spend.check(training.trained + training.refused + evaluated,
                                 self.run_dir.name, rnd)
        state.spend = self.spend.to_json()
        line = {
            "round": rnd,
            **evaluation.metrics,
            "epsilon": max(state.epsilon_by_client.values()),
            "delta": self.config["delta"],
            "central_epsilon": state.central_epsilon,
            "round_seconds": seconds,
            "bytes_up": sum(r.bytes_up for r in training.trained + training.refused + evaluated),
            "bytes_down": training.bytes_down + evaluation.bytes_down,
            "clients": rows,
            "dropouts": dropouts(training.refused),
            "failures": training.failures + evaluation.failures,
            "skipped": training.skipped,
            "privacy_flags": flags,
        }
        if rnd == 0:
            state.first_loss = line["eval_loss"]
        state.energy_total = add_costs(line, self.config["batch-size"], len(self.nodes.nodes),
                                       state.energy_total, state.first_loss)
        append_metrics(self.run_dir, line)
        state.round = rnd
        state.save(self.run_dir)
        self.echo(summary_line(line, self.config["num-server-rounds"]))


def run_federation(grid: Grid, config: dict[str, Any], run_dir: Path,
                   echo: Callable[[str], None] = print, simulation: bool = False) -> Path:
    """Round 0 evaluation, then `num-server-rounds` of train + evaluate; writes run_dir."""
    Federation(grid, config, run_dir, echo, simulation).run()
    return run_dir
