"""fedslm's strategies over LoRA adapters, shaped like Flower's message-API strategies.

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
its own update already (sample-level DP); the server adds none unless central-dp
(server/central_dp.py wraps a strategy).

Each strategy subclasses Flower's `Strategy`, but fedslm's round engine
(server/engine.py) calls configure_*/aggregate_* itself instead of `Strategy.start()`:
a fedslm round also waits for nodes, skips its training when fewer than `min-replies`
updates pass validation, stops when every client's privacy budget is spent,
checkpoints so that a stopped run resumes, and records each client's reply in
metrics.jsonl; and round 0 is a federated evaluation that gathers the clients' shared
initial adapter, where `start()` takes initial arrays and evaluates centrally.

A new strategy is a subclass here with its `name` (which registers it in STRATEGIES)
and its `average`; what it asks of the clients is its StrategySpec in contracts/adapter.py.
"""

from __future__ import annotations

import logging
import math
from abc import abstractmethod
from collections.abc import Iterable, Sequence
from typing import Any, ClassVar

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from contracts.adapter import Arrays, cut_to_rank, is_lora_a, rank_of, sent_part, spec
from contracts.wire import (
    ARRAYS,
    CONFIG,
    EVAL_CORRECT,
    EVAL_LOSS_SUM,
    EVAL_TOKENS,
    METRICS,
    NUM_EXAMPLES,
    SERVER_ROUND,
    TASK_ANSWER_ITEMS,
    TASK_CHOICE_CORRECT,
    TASK_CHOICE_CORRECT_NORM,
    TASK_CHOICE_ITEMS,
    TASK_EXACT,
    TASK_F1_SUM,
)
from server.nodes import NodePool
from server.replies import from_record, to_record

log = logging.getLogger("fedslm")
Update = tuple[Arrays, float]  # an adapter and its weight (the client's example count)


def fedavg(updates: Sequence[Update]) -> Arrays:
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


def hetlora(updates: Sequence[Update], rank: int) -> Arrays:
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


def evaluation(metrics: Sequence[MetricRecord]) -> MetricRecord:
    """Held-out loss, perplexity and token accuracy over every evaluated token of the
    clients that released their sums (NaN when none did); and, where clients evaluated a
    task, its accuracy over every item."""
    task = task_metrics(metrics)
    metrics = [m for m in metrics if EVAL_TOKENS in m]
    tokens = sum(m[EVAL_TOKENS] for m in metrics)
    loss = sum(m[EVAL_LOSS_SUM] for m in metrics) / tokens if tokens else math.nan
    return MetricRecord({
        "eval_loss": loss,
        "perplexity": math.exp(loss) if loss < 700 else math.inf,
        "token_accuracy": sum(m[EVAL_CORRECT] for m in metrics) / tokens if tokens else 0,
        **task,
    })


def task_metrics(metrics: Sequence[MetricRecord]) -> dict[str, float]:
    """Task accuracy (and normalised) over every multiple-choice item, exact match and F1
    over every short answer, with the item counts; {} when no client released any."""
    def total(key: str) -> float:
        return sum(m.get(key, 0) for m in metrics)

    out: dict[str, float] = {}
    if items := total(TASK_CHOICE_ITEMS):
        out.update(task_items=int(items), task_accuracy=total(TASK_CHOICE_CORRECT) / items,
                   task_accuracy_norm=total(TASK_CHOICE_CORRECT_NORM) / items)
    if answers := total(TASK_ANSWER_ITEMS):
        out.update(task_answers=int(answers), task_exact_match=total(TASK_EXACT) / answers,
                   task_f1=total(TASK_F1_SUM) / answers)
    return out


STRATEGIES: dict[str, type[AdapterStrategy]] = {}


class AdapterStrategy(Strategy):
    """A strategy over a global LoRA adapter. The global adapter comes in as the
    `arrays` of configure_*; what is sent of it follows the strategy's StrategySpec;
    aggregate_train returns the whole new global adapter."""

    name: ClassVar[str]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "name" in cls.__dict__:
            spec(cls.name)  # ValueError unless the clients know it (contracts/adapter.py)
            STRATEGIES[cls.name] = cls

    def __init__(self, nodes: NodePool) -> None:
        self.nodes = nodes
        self.current: Arrays = {}  # the global adapter the last configured round sent
        self.sample_rate = 1.0  # q at which the last round's trainers were sampled

    def summary(self) -> None:
        log.info("strategy %s, node sampling %s", self.name, self.nodes.sampling)

    def start(self, *args: Any, **kwargs: Any) -> Any:
        """Not used: aggregate_train needs updates that server/validation.py decoded and
        checked, which Flower's loop does not do; server/engine.py runs the rounds."""
        raise NotImplementedError("fedslm strategies are run by server.engine.Federation")

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        """A train message, with what the strategy sends of `arrays`, to each sampled node."""
        nodes, self.sample_rate = self.nodes.for_training(server_round, grid)
        return self._messages(MessageType.TRAIN, server_round, nodes, arrays, config)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        """An evaluate message to each evaluating node."""
        nodes = self.nodes.for_evaluation(server_round, grid)
        return self._messages(MessageType.EVALUATE, server_round, nodes, arrays, config)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """The new global adapter from the replies' (validated, decoded) updates, and
        the number of examples they trained on; (None, None) without updates."""
        updates = self.updates(replies)
        if not updates:
            return None, None
        total = float(sum(weight for _, weight in updates))
        return to_record(self.merge(self.average(updates))), MetricRecord({NUM_EXAMPLES: total})

    def aggregate_evaluate(self, server_round: int,
                           replies: Iterable[Message]) -> MetricRecord | None:
        """eval_loss, perplexity and token_accuracy over the replies' tokens."""
        metrics = [m.content[METRICS] for m in replies if not m.has_error()]
        return evaluation(metrics) if metrics else None

    def sent(self) -> Arrays:
        """What the last configured round sent of the global adapter."""
        return sent_part(self.current, self.name)

    def expected_update(self, update: Arrays) -> Arrays:
        """The adapter a client's update must fit (names, shapes, dtypes): what it was sent."""
        return self.sent()

    def updates(self, replies: Iterable[Message]) -> list[Update]:
        """Each reply's update and its weight, in the order of the replies."""
        return [(from_record(m.content.array_records[ARRAYS]),
                 m.content[METRICS][NUM_EXAMPLES]) for m in replies if not m.has_error()]

    @abstractmethod
    def average(self, updates: Sequence[Update]) -> Arrays:
        """The aggregate of the updates (of what was sent)."""

    def merge(self, aggregate: Arrays) -> Arrays:
        """The new global adapter: the aggregate, and what was not sent as it was."""
        return {**self.current, **aggregate}

    def privacy_spent(self) -> float | None:
        """The user-level ε of the released adapters; None without central DP."""
        return None

    def close(self) -> None:
        """Release what the strategy holds open (nothing, without central DP)."""

    def _messages(self, kind: str, rnd: int, nodes: list[int], arrays: ArrayRecord,
                  config: ConfigRecord) -> list[Message]:
        self.current = from_record(arrays)
        record = to_record(sent_part(self.current, self.name))
        config = ConfigRecord({**dict(config), SERVER_ROUND: rnd})
        return [Message(RecordDict({ARRAYS: record, CONFIG: config}), dst_node_id=node,
                        message_type=kind, group_id=str(rnd)) for node in nodes]


class FedAvg(AdapterStrategy):
    """The example-weighted mean of every tensor sent."""

    name = "fedavg"

    def average(self, updates: Sequence[Update]) -> Arrays:
        return fedavg(updates)


class FfaLora(FedAvg):
    """FedAvg of B alone: A stays the shared seeded start and is never sent."""

    name = "ffa-lora"


class HetLora(AdapterStrategy):
    """Clients of different ranks: each sends the first components of the global adapter."""

    name = "hetlora"

    def expected_update(self, update: Arrays) -> Arrays:
        return cut_to_rank(self.sent(), rank_of(update))

    def average(self, updates: Sequence[Update]) -> Arrays:
        return hetlora(updates, rank_of(self.current))
