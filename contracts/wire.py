"""The keys of client replies, their statuses, and the one encoding of ε = ∞.

A reply to a train or evaluate message holds `metrics` (a MetricRecord of numbers),
`info` (a ConfigRecord of strings) and, for train, `arrays` (the encoded update).
"""

from __future__ import annotations

import math
from enum import StrEnum

# metrics (numbers)
EPSILON = "epsilon"
DELTA = "delta"
NUM_EXAMPLES = "num-examples"
NOISE_MULTIPLIER = "noise-multiplier"
CLIP_NORM = "clip-norm"
SAMPLE_RATE = "sample-rate"
STEPS = "steps"
TRAIN_SECONDS = "train-seconds"
CPU_SECONDS = "cpu-seconds"
ENERGY_J = "energy-j"
PEAK_RSS_MB = "peak-rss-mb"
BUDGET_EPSILON = "budget-epsilon"
BUDGET_DELTA = "budget-delta"
EVAL_LOSS_SUM = "eval-loss-sum"
EVAL_TOKENS = "eval-tokens"
EVAL_CORRECT = "eval-correct"
EVAL_SECONDS = "eval-seconds"
TASK_CHOICE_ITEMS = "task-choice-items"  # task evaluation (client/tasks.py): sums
TASK_CHOICE_CORRECT = "task-choice-correct"
TASK_CHOICE_CORRECT_NORM = "task-choice-correct-norm"
TASK_ANSWER_ITEMS = "task-answer-items"
TASK_EXACT = "task-exact"
TASK_F1_SUM = "task-f1-sum"
# info (strings)
CLIENT = "client"
STATUS = "status"
ENERGY_METHOD = "energy-method"
QUANTIZATION = "quantization"
QUANTIZATION_REASON = "quantization-reason"
COMPUTE_DTYPE = "compute-dtype"
ADAPTER_CONFIG = "adapter-config"
LEDGER_ID = "ledger-id"  # the random id of the client's privacy ledger (server/spend.py)
CODEC_ERROR = "codec-error"  # set by the server on an update it could not decode
# message content
ARRAYS, CONFIG, METRICS, INFO = "arrays", "config", "metrics", "info"
SERVER_ROUND = "server-round"
RUN_ID = "run-id"  # which run a config, a ledger entry's spend or a progress record is of


# Why each item of a reply may leave the device (docs/privacy.md, "What leaves a device").
# Replace-one adjacency makes a dataset's size n public; nothing else about the data is.
DP = "dp-protected"  # the update: clipped per example and noised
PUBLIC = "public"  # a function of the run's config, n and the ledger's (public) history
DATA_INDEPENDENT = "data-independent"  # the device's hardware and software, random ids
OWNER_RELEASED = "owner-released"  # outside DP: only with the node's release-stats = true
RELEASES = {
    ARRAYS: DP,
    EPSILON: PUBLIC, DELTA: PUBLIC, NUM_EXAMPLES: PUBLIC, NOISE_MULTIPLIER: PUBLIC,
    CLIP_NORM: PUBLIC, SAMPLE_RATE: PUBLIC, STEPS: PUBLIC, BUDGET_EPSILON: PUBLIC,
    BUDGET_DELTA: PUBLIC, CLIENT: PUBLIC, STATUS: PUBLIC, ADAPTER_CONFIG: PUBLIC,
    ENERGY_METHOD: DATA_INDEPENDENT, QUANTIZATION: DATA_INDEPENDENT,
    QUANTIZATION_REASON: DATA_INDEPENDENT, COMPUTE_DTYPE: DATA_INDEPENDENT,
    LEDGER_ID: DATA_INDEPENDENT,
    # the Poisson draws' sizes and the records' lengths show in these; DP does not cover them
    TRAIN_SECONDS: OWNER_RELEASED, CPU_SECONDS: OWNER_RELEASED, ENERGY_J: OWNER_RELEASED,
    PEAK_RSS_MB: OWNER_RELEASED, EVAL_SECONDS: OWNER_RELEASED,
    # exact sums over the owner's held-out records
    EVAL_LOSS_SUM: OWNER_RELEASED, EVAL_TOKENS: OWNER_RELEASED, EVAL_CORRECT: OWNER_RELEASED,
    # exact counts over the owner's task items (its evaluation data may be private too)
    TASK_CHOICE_ITEMS: OWNER_RELEASED, TASK_CHOICE_CORRECT: OWNER_RELEASED,
    TASK_CHOICE_CORRECT_NORM: OWNER_RELEASED, TASK_ANSWER_ITEMS: OWNER_RELEASED,
    TASK_EXACT: OWNER_RELEASED, TASK_F1_SUM: OWNER_RELEASED,
}


def released(values: dict, release_stats: bool) -> dict:
    """`values` without the owner-released items unless the owner chose to release them;
    KeyError for an item RELEASES does not declare (a new key must be classified first)."""
    return {k: v for k, v in values.items()
            if RELEASES[k] != OWNER_RELEASED or release_stats}


class Status(StrEnum):
    """A client's outcome in a round: the text before ': reason' in its status."""

    OK = "ok"  # a client's own word: it did its work
    TRAINED = "trained"  # the server used its update
    EVALUATED = "evaluated"  # round 0: evaluation only
    REFUSED = "refused"  # it did not train: its privacy budget does not allow it
    REJECTED = "rejected"  # it trained (its spend counts) but the update failed validation
    UNUSED = "unused"  # it trained, but the round was skipped (too few usable updates)


def status_text(status: Status, reason: str = "") -> str:
    return f"{status.value}: {reason}" if reason else status.value


# ε = ∞ (training without DP): MetricRecord and strict JSON hold no inf; in run records
# (JSON) it is null (contracts.rundir.finite writes it, epsilon_from_json reads it).
WIRE_INFINITY = -1.0  # in a MetricRecord; ε is never negative otherwise


def epsilon_to_wire(value: float) -> float:
    return value if math.isfinite(value) else WIRE_INFINITY


def epsilon_from_wire(value: float) -> float:
    return math.inf if value < 0 else value


def epsilon_from_json(value: float | None) -> float:
    return math.inf if value is None else float(value)


def format_epsilon(value: float | None, digits: int = 2) -> str:
    """For people: ∞ when there is no DP."""
    if value is None or math.isinf(value):
        return "∞"
    return f"{value:.{digits}f}"
