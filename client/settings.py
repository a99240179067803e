"""What one client round needs to know: the server's config plus the node's own."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from client.profiles import profile

# Keys a SuperNode may set in its node config (they win over the server's config).
NODE_KEYS = ("data", "partition-id", "client", "state-dir", "quantization", "device", "threads",
             "budget-epsilon", "budget-delta", "device-profile", "cache-dir", "lora-r",
             "micro-batch-tokens")


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
    micro_batch: int  # 0: the whole drawn batch in one forward/backward
    local_steps: int
    lr: float
    optimizer: str
    lora_r: int
    lora_alpha: float
    lora_dropout: float
    lora_targets: tuple[str, ...]
    dp: bool
    target_epsilon: float
    delta: float
    noise_multiplier: float | None  # None: derived from target_epsilon
    clip_norm: float
    budget_epsilon: float | None  # the data owner's hard limit on cumulative ε
    budget_delta: float | None
    max_eval_seqs: int
    seed: int
    reproducible: bool
    cache_dir: str
    canary_file: str  # set by an empirical audit run: canaries to plant in partition 0
    strategy: str
    update_encoding: str
    dropout_rate: float  # simulation only: the chance that this client fails a round

    @classmethod
    def from_records(cls, config: dict[str, Any], node: dict[str, Any]) -> ClientSettings:
        merged = {**config, **{k: v for k, v in node.items() if k in NODE_KEYS}}

        def get(key: str, default: Any = None) -> Any:
            if key not in merged and default is None:
                raise ValueError(f"client config is missing {key!r}")
            return merged.get(key, default)

        noise = get("noise-multiplier", "auto")
        partition = int(get("partition-id", 0))
        device_profile = str(get("device-profile", "generic-cpu"))
        simulated = [p.strip() for p in str(config.get("simulated-profiles", "")).split(",")
                     if p.strip()]
        if simulated and "device-profile" not in node:
            device_profile = simulated[partition % len(simulated)]
        strategy = str(get("strategy", "fedavg"))
        rank, alpha = _lora_rank(strategy, config, node, device_profile)
        return cls(
            run_id=str(get("run-id", "local")),
            round=int(get("server-round", 0)),
            num_rounds=int(get("num-server-rounds")),
            model=str(get("model")),
            quantization=str(get("quantization")),
            device=str(get("device", "auto")),
            threads=int(get("threads", 0)),
            device_profile=device_profile,
            data=str(get("data")),
            partition=partition,
            client=str(get("client", "")),
            state_dir=str(get("state-dir", "")),
            state_root=str(get("state-root", "")),
            seq_len=int(get("seq-len")),
            batch_size=int(get("batch-size")),
            micro_batch=micro_batch(int(get("micro-batch-tokens", 0)), int(get("seq-len"))),
            local_steps=int(get("local-steps")),
            lr=float(get("lr")),
            optimizer=str(get("optimizer", "adamw")),
            lora_r=rank,
            lora_alpha=alpha,
            lora_dropout=float(get("lora-dropout", 0.0)),
            lora_targets=tuple(t.strip() for t in str(get("lora-targets")).split(",") if t.strip()),
            dp=bool(get("dp")),
            target_epsilon=float(get("target-epsilon")),
            delta=float(get("delta")),
            noise_multiplier=None if str(noise) == "auto" else float(noise),
            clip_norm=float(get("clip-norm")),
            budget_epsilon=_positive_or_none(get("budget-epsilon", 0.0)),
            budget_delta=_positive_or_none(get("budget-delta", 0.0)),
            max_eval_seqs=int(get("max-eval-seqs", 32)),
            seed=int(get("seed", 0)),
            reproducible=bool(get("reproducible", False)),
            cache_dir=str(get("cache-dir", "")),
            canary_file=str(get("canary-file", "")),
            strategy=strategy,
            update_encoding=str(get("update-encoding", "float32")),
            dropout_rate=float(get("dropout-rate", 0.0)),
        )

    def resolved_state_dir(self, client: str) -> Path:
        if self.state_dir:
            return Path(self.state_dir)
        if self.state_root:
            return Path(self.state_root) / client
        base = os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state"
        return Path(base) / "fedslm" / client


def micro_batch(tokens: int, seq_len: int) -> int:
    """Sequences per forward/backward for a `micro-batch-tokens` budget (0: no limit)."""
    return max(1, tokens // seq_len) if tokens > 0 else 0


def _positive_or_none(value: Any) -> float | None:
    value = float(value)
    return value if value > 0 else None


def _lora_rank(strategy: str, config: dict[str, Any], node: dict[str, Any],
               device_profile: str) -> tuple[int, float]:
    """(rank, alpha) of this client's adapter. Under hetlora a client trains the rank its
    node config or device profile gives, at most the server's `lora-r`, and alpha is
    scaled with the rank so that every client's update has the same scale (alpha / r)."""
    top, alpha = int(config["lora-r"]), float(config["lora-alpha"])
    if strategy != "hetlora":
        return int(node.get("lora-r", top)), alpha
    rank = int(node["lora-r"]) if "lora-r" in node else profile(device_profile).lora_rank
    rank = max(1, min(rank, top))
    return rank, alpha * rank / top
