"""What one client round needs to know: the server's config plus the node's own.

Every key, its default and its check come from contracts/config.py; the node config
(a SuperNode's own values) is checked by the same rules and wins for the keys a node
may set (contracts.config.NODE_KEYS).

`release-stats` is the data owner's alone: only a node config sets it. Its default is
false on a device and true in a simulation, whose partitions are all the simulating
user's own data on their own machine.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from client.profiles import profile
from contracts.adapter import spec
from contracts.config import NODE_KEYS, RUN_KEYS, SCHEMA, validate, validate_node
from contracts.environment import SIMULATION
from contracts.wire import RUN_ID, SERVER_ROUND

LOCAL_RUN = "local"  # the run id of a config that names none


@dataclass(frozen=True)
class ClientSettings:
    run_id: str
    round: int
    num_rounds: int
    model: str
    quantization: str
    device: str
    threads: int
    device_profile: str
    data: str
    partition: int
    client: str  # "" until the data partition names it
    state_dir: str  # "" -> <state-root>/<client>
    state_root: str
    seq_len: int
    batch_size: int
    micro_batch_tokens: int | str  # "auto" or a budget (0: the whole drawn batch at once)
    local_steps: int
    lr: float
    optimizer: str
    lora_r: int
    lora_alpha: float
    lora_dropout: float
    lora_targets: tuple[str, ...]
    lora_layers: int  # LoRA on the top N decoder layers (0: all)
    frozen_cache: bool  # cache the frozen lower layers' outputs (client/frozen_prefix.py)
    dp: bool
    target_epsilon: float
    delta: float
    noise_multiplier: float | None  # None: derived from target_epsilon
    clip_norm: float
    budget_epsilon: float | None  # the data owner's hard limit on cumulative ε
    budget_delta: float | None
    max_eval_seqs: int
    completion_only: bool  # completion-only-loss
    eval_task: str  # a task file, `plays`, or "" (client/tasks.py)
    max_task_items: int  # 0: all of this client's items
    task_max_new_tokens: int
    seed: int
    reproducible: bool
    cache_dir: str
    canary_file: str  # set by an empirical audit run: canaries to plant in partition 0
    strategy: str
    update_encoding: str
    dropout_rate: float  # simulation only: the chance that this client fails a round
    progress_seconds: float  # how often the client logs its progress while it trains
    release_stats: bool  # send timings, energy, memory and held-out sums (outside DP)

    @classmethod
    def from_records(cls, config: dict[str, Any], node: dict[str, Any]) -> ClientSettings:
        """The server's config record (its run keys checked, as given; the server adds
        `run-id` and `server-round`) with the node config's checked values over it.
        ConfigError, naming the key, for a bad value in either."""
        run = validate({k: v for k, v in config.items() if k in RUN_KEYS})
        own = validate_node(node)
        merged = {**run, **{k: SCHEMA[k].default for k in NODE_KEYS if k not in run}, **own}
        device_profile = _device_profile(run, own)
        rank, alpha = _lora_rank(run, own, device_profile)
        return cls(
            run_id=str(config.get(RUN_ID, LOCAL_RUN)),
            round=int(config.get(SERVER_ROUND, 0)),
            num_rounds=merged["num-server-rounds"],
            **_model_fields(merged),
            device_profile=device_profile,
            **_data_fields(merged),
            **_training_fields(merged),
            lora_r=rank,
            lora_alpha=alpha,
            **_privacy_fields(merged),
            release_stats=own.get("release-stats", os.environ.get(SIMULATION) == "1"),
        )

    def resolved_state_dir(self, client: str) -> Path:
        if self.state_dir:
            return Path(self.state_dir)
        if self.state_root:
            return Path(self.state_root) / client
        base = os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state"
        return Path(base) / "fedslm" / client


def _model_fields(c: dict[str, Any]) -> dict[str, Any]:
    return {
        "model": c["model"], "quantization": c["quantization"], "device": c["device"],
        "threads": c["threads"], "lora_dropout": c["lora-dropout"],
        "lora_targets": tuple(t.strip() for t in c["lora-targets"].split(",") if t.strip()),
        "lora_layers": c["lora-layers"], "frozen_cache": c["frozen-cache"],
        "seed": c["seed"], "reproducible": c["reproducible"], "cache_dir": c["cache-dir"],
        "strategy": c["strategy"], "update_encoding": c["update-encoding"],
        "dropout_rate": c["dropout-rate"],
    }


def _data_fields(c: dict[str, Any]) -> dict[str, Any]:
    return {
        "data": c["data"], "partition": c["partition-id"], "client": c["client"],
        "state_dir": c["state-dir"], "state_root": c["state-root"], "seq_len": c["seq-len"],
        "max_eval_seqs": c["max-eval-seqs"], "canary_file": c["canary-file"],
        "completion_only": c["completion-only-loss"], "eval_task": c["eval-task"],
        "max_task_items": c["max-task-items"], "task_max_new_tokens": c["task-max-new-tokens"],
    }


def _training_fields(c: dict[str, Any]) -> dict[str, Any]:
    return {
        "batch_size": c["batch-size"], "micro_batch_tokens": c["micro-batch-tokens"],
        "local_steps": c["local-steps"], "lr": c["lr"], "optimizer": c["optimizer"],
        "progress_seconds": c["progress-seconds"],
    }


def _privacy_fields(c: dict[str, Any]) -> dict[str, Any]:
    noise = c["noise-multiplier"]
    return {
        "dp": c["dp"], "target_epsilon": c["target-epsilon"], "delta": c["delta"],
        "noise_multiplier": None if noise == "auto" else float(noise),
        "clip_norm": c["clip-norm"], "budget_epsilon": _positive_or_none(c["budget-epsilon"]),
        "budget_delta": _positive_or_none(c["budget-delta"]),
    }


# `micro-batch-tokens = auto` by compute dtype: what keeps the client's peak memory under
# 1.5 GiB at the demo and bench shapes (docs/speed.md); fp32 activations and weights
# take twice the bytes of bf16 ones, and fp32 is the path of CPUs without bf16.
AUTO_MICRO_BATCH_TOKENS = {"float32": 64}
AUTO_MICRO_BATCH_TOKENS_16BIT = 512


def micro_batch(tokens: int | str, seq_len: int, dtype: str = "bfloat16") -> int:
    """Sequences per forward/backward for a `micro-batch-tokens` budget (0: no limit;
    `auto`: by the compute dtype)."""
    if tokens == "auto":
        tokens = AUTO_MICRO_BATCH_TOKENS.get(dtype, AUTO_MICRO_BATCH_TOKENS_16BIT)
    return max(1, int(tokens) // seq_len) if int(tokens) > 0 else 0


def _positive_or_none(value: float) -> float | None:
    return value if value > 0 else None


def _device_profile(run: dict[str, Any], node: dict[str, Any]) -> str:
    """The node's own profile; in a simulation, `simulated-profiles` in turn by partition."""
    simulated = [p.strip() for p in run["simulated-profiles"].split(",") if p.strip()]
    if simulated and "device-profile" not in node:
        return simulated[node.get("partition-id", 0) % len(simulated)]
    return node.get("device-profile", run["device-profile"])


def _lora_rank(run: dict[str, Any], node: dict[str, Any], device_profile: str
               ) -> tuple[int, float]:
    """(rank, alpha) of this client's adapter. Under a strategy with a rank per client a
    client trains the rank its node config or device profile gives, at most the server's
    `lora-r`, and alpha is scaled with the rank so that every client's update has the
    same scale (alpha / r)."""
    top, alpha = run["lora-r"], run["lora-alpha"]
    if not spec(run["strategy"]).rank_per_client:
        return node.get("lora-r", top), alpha
    rank = node["lora-r"] if "lora-r" in node else profile(device_profile).lora_rank
    rank = max(1, min(rank, top))
    return rank, alpha * rank / top
