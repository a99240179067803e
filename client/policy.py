"""A device owner's policy: what a coordinator's run may ask of this device.

In a deployment the coordinator (whoever submits `flwr run`) is another party. The
owner's policy file, given to `fedslm supernode --policy`, decides the device's privacy:
DP or not, the lifetime (ε, δ) budget, the largest δ and per-run ε, the privacy unit
(`seq-len`), the data and task, the models allowed, and caps on what a run may cost. A
run config may only ask for something stricter; anything else is refused (the reason
goes to the device's log, a short code to the server), and the keys the owner decides
are taken from the policy whatever the run config says.

A policy file is flat TOML, `key = value`, with the keys of POLICY_KEYS.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from contracts.config import (
    RUN_KEYS,
    SCHEMA,
    ConfigError,
    read_toml,
    validate,
    validate_node,
)

# Refusal codes: all that a device tells the server about a refusal or a failure.
REFUSED_BY_POLICY = "refused-by-policy"
OVER_BUDGET = "over-budget"
BAD_PLAN = "bad-plan"
INTERNAL = "internal"
CODES = (REFUSED_BY_POLICY, OVER_BUDGET, BAD_PLAN, INTERNAL)

PINNED = "@sha256:"  # models entry `<path>@sha256:<hex>`: that path, with that content
CLIP_RANGE = (1e-3, 1e3)  # clip-norm a device accepts
# run-config keys the owner decides: the server's values are replaced by the policy's
OWNER_KEYS = ("data", "partition-id", "client", "eval-task", "release-stats")
# node keys that spend the device's resources: a run config cannot set them on a device
RESOURCE_KEYS = ("quantization", "device", "threads", "device-profile", "micro-batch-tokens",
                 "frozen-cache")
# run-config keys of a simulation only: a device refuses a run that sets them
SIMULATION_ONLY = {"reproducible": False, "canary-file": "", "dropout-rate": 0.0}


class PolicyError(ConfigError):
    """A policy file that cannot be used (the owner's input)."""


class Refusal(Exception):  # noqa: N818 - a decision, not a failure
    """A message the device will not serve: a code from CODES for the server, the
    reason for the owner's log."""

    def __init__(self, code: str, reason: str) -> None:
        super().__init__(reason)
        self.code, self.reason = code, reason


@dataclass(frozen=True)
class Policy:
    budget_epsilon: float  # lifetime, over every run this device serves
    budget_delta: float = 1e-5
    max_delta: float = 1e-5
    max_epsilon_per_run: float = 0.0  # 0: the lifetime budget
    allow_non_dp: bool = False
    seq_len: int = 64  # the privacy unit of free text: every run cuts windows of this many
    max_local_steps: int = 50
    max_batch_size: int = 64
    max_rounds_per_run: int = 20
    max_lora_r: int = 64
    models: tuple[str, ...] = ("embedded",)
    data: str = "embedded"
    partition_id: int = 0
    client: str = ""  # the name the server sees; "" -> the state folder's name
    eval_task: str = ""
    release_stats: bool = False
    source: str = field(default="", compare=False)

    @property
    def per_run_epsilon(self) -> float:
        return self.max_epsilon_per_run or self.budget_epsilon

    def to_json(self) -> dict[str, Any]:
        out = {k.replace("_", "-"): v for k, v in asdict(self).items() if k != "source"}
        out["models"] = list(self.models)
        return out


POLICY_KEYS = tuple(f.replace("_", "-") for f in Policy.__dataclass_fields__ if f != "source")


def load_policy(path: str | Path) -> Policy:
    """The policy in a TOML file; PolicyError naming the file and key otherwise."""
    try:
        raw = read_toml(path, "policy file")
    except ConfigError as exc:
        raise PolicyError(str(exc)) from None
    return policy_from(raw, str(Path(path).resolve()))


def policy_from(raw: dict[str, Any], source: str = "") -> Policy:
    where = f"policy {source}" if source else "policy"
    unknown = sorted(set(raw) - set(POLICY_KEYS))
    if unknown:
        raise PolicyError(f"{where}: unknown key {unknown[0]!r} (known: {', '.join(POLICY_KEYS)})")
    if "budget-epsilon" not in raw:
        raise PolicyError(f"{where}: `budget-epsilon` (the device's lifetime ε budget) is "
                          "required")
    values = {}
    for key, value in raw.items():
        name = key.replace("-", "_")
        kind = type(Policy.__dataclass_fields__[name].default) \
            if name != "budget_epsilon" else float
        values[name] = _typed(where, key, value, kind)
    policy = Policy(**values, source=source)
    _check(policy, where)
    return policy


def _typed(where: str, key: str, value: Any, kind: type) -> Any:
    if kind is tuple:
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            raise PolicyError(f"{where}: {key!r} must be a list of strings, got {value!r}")
        return tuple(value)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if type(value) is not kind:
        raise PolicyError(f"{where}: {key!r} must be a {kind.__name__}, got {value!r}")
    return value


def _check(p: Policy, where: str) -> None:
    problems = {
        "budget-epsilon": 0 < p.budget_epsilon < math.inf,
        "budget-delta": 0 < p.budget_delta < 1,
        "max-delta": 0 < p.max_delta < 1,
        "max-epsilon-per-run": 0 <= p.max_epsilon_per_run < math.inf,
        "seq-len": p.seq_len > 0,
        "max-local-steps": p.max_local_steps > 0,
        "max-batch-size": p.max_batch_size > 0,
        "max-rounds-per-run": p.max_rounds_per_run > 0,
        "max-lora-r": p.max_lora_r > 0,
        "models": bool(p.models),
        "data": bool(p.data.strip()),
        "partition-id": p.partition_id >= 0,
    }
    bad = [k for k, ok in problems.items() if not ok]
    if bad:
        raise PolicyError(f"{where}: {bad[0]!r} is out of range (see docs/deployment.md, "
                          "Writing a device policy)")


def checked_node_config(node_config: dict[str, Any]) -> dict[str, Any]:
    """The node config's own keys (device, threads, profile ...), checked; the keys the
    policy decides are refused there, so that there is one place for each."""
    owned = sorted(set(node_config) & {*OWNER_KEYS, "budget-epsilon", "budget-delta",
                                       "state-dir", "cache-dir"})
    if owned:
        raise PolicyError(f"node config key {owned[0]!r} is the device policy's: set it in "
                          "the policy file (or, for state-dir/cache-dir, with --state)")
    return validate_node(node_config)


def apply(policy: Policy, config: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the run config, checked; the owner's node keys) for a message's config record;
    Refusal (refused-by-policy) when the run asks for anything the policy does not allow.
    Node keys win over run keys (client/settings.py), so the data, task, budget and
    release of stats are the owner's; the caller adds the device's node config and
    state folders."""
    try:
        run = validate({k: v for k, v in config.items() if k in RUN_KEYS})
    except ConfigError as exc:
        raise Refusal(REFUSED_BY_POLICY, f"the run config is invalid: {exc}") from None
    for key, allowed in SIMULATION_ONLY.items():
        if run[key] != allowed:
            raise Refusal(REFUSED_BY_POLICY, f"{key}={run[key]!r} is for simulations only: "
                          "a device draws its noise and samples from the OS's secure "
                          "randomness and plants no records")
    _refuse_unless(policy.allow_non_dp or run["dp"],
                   "dp=false: this device trains only under DP (policy allow-non-dp)")
    _refuse_unless(run["noise-multiplier"] == "auto" or run["noise-multiplier"] > 0 or
                   not run["dp"], "noise-multiplier=0 is no noise")
    _refuse_unless(run["delta"] <= policy.max_delta,
                   f"delta={run['delta']:g} is over the policy's max-delta={policy.max_delta:g}")
    _refuse_unless(run["seq-len"] == policy.seq_len,
                   f"seq-len={run['seq-len']} is not the policy's privacy unit "
                   f"seq-len={policy.seq_len}: windows of another length would straddle "
                   "the units earlier runs were charged for")
    _refuse_unless(CLIP_RANGE[0] <= run["clip-norm"] <= CLIP_RANGE[1],
                   f"clip-norm={run['clip-norm']:g} is outside {CLIP_RANGE[0]:g}.."
                   f"{CLIP_RANGE[1]:g} (a tiny clip norm's float rounding can exceed it)")
    for key, cap in (("local-steps", policy.max_local_steps),
                     ("batch-size", policy.max_batch_size),
                     ("num-server-rounds", policy.max_rounds_per_run),
                     ("lora-r", policy.max_lora_r)):
        _refuse_unless(run[key] <= cap, f"{key}={run[key]} is over the policy's cap {cap}")
    _refuse_unless(model_allowed(policy, run["model"]),
                   f"model {run['model']!r} is not in the policy's models")
    run["simulated-profiles"] = ""  # a simulation's; the node config names the device's
    for key in RESOURCE_KEYS:  # the device's: its node config, else the default
        run[key] = SCHEMA[key].default
    budget = [policy.budget_epsilon, policy.budget_delta]
    if run["budget-epsilon"] > 0:  # the run may ask for a stricter budget, never a looser
        budget[0] = min(budget[0], run["budget-epsilon"])
    if run["budget-delta"] > 0:
        budget[1] = min(budget[1], run["budget-delta"])
    owner = {"data": policy.data, "partition-id": policy.partition_id,
             "eval-task": policy.eval_task, "release-stats": policy.release_stats,
             "budget-epsilon": budget[0], "budget-delta": budget[1]}
    if policy.client:
        owner["client"] = policy.client
    return run, owner


def ignored_keys(policy: Policy, config: dict[str, Any]) -> list[str]:
    """The run config's owner keys that differ from the policy's (for the device's log)."""
    mine = {"data": policy.data, "eval-task": policy.eval_task}
    return [f"{k}={config[k]!r}" for k in mine if k in config and config[k] != mine[k]]


def _refuse_unless(ok: bool, reason: str) -> None:
    if not ok:
        raise Refusal(REFUSED_BY_POLICY, reason)


def model_allowed(policy: Policy, model: str) -> bool:
    """The run's model is named in `models`: by the same text, or as `<path>@sha256:<hex>`,
    the same path whose content (a file's sha256, or a folder's: model_digest) is that.
    Only paths the owner named are ever read: a model text the policy does not name is
    refused without looking at it."""
    if model in policy.models:
        return True
    pinned = {entry.partition(PINNED)[0]: entry.partition(PINNED)[2].lower()
              for entry in policy.models if PINNED in entry}
    if model not in pinned:
        return False
    path = Path(model).expanduser()
    return path.exists() and model_digest(path) == pinned[model]


_DIGESTS: dict[tuple, str] = {}


def model_digest(path: Path) -> str:
    """sha256 of a file; of a folder, sha256 over its files' relative paths and sha256s in
    sorted order. Kept per (path, sizes, modification times) for the process's life."""
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    stamp = (str(path.resolve()), *((str(f), f.stat().st_size, f.stat().st_mtime_ns)
                                    for f in files))
    if stamp not in _DIGESTS:
        if path.is_file():
            _DIGESTS[stamp] = _file_sha256(path)
        else:
            outer = hashlib.sha256()
            for f in files:
                outer.update(f"{f.relative_to(path).as_posix()}\0{_file_sha256(f)}\n".encode())
            _DIGESTS[stamp] = outer.hexdigest()
    return _DIGESTS[stamp]


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# Who decides each configuration key on a device started by `fedslm supernode`: the
# table of docs/privacy.md (kept equal by a test). A new key fails that test until it is
# classified here.
COORDINATOR = "coordinator"
OWNER = "owner: policy file"
NODE = "owner: node config (else the default; the run config's value is ignored)"
SERVER_SIDE = "coordinator (server only, never sent to a device)"
DECIDES: dict[str, tuple[str, str]] = {
    "num-server-rounds": (COORDINATOR, "at most `max-rounds-per-run`; fixed in the run's plan: "
                          "a train message beyond it is refused"),
    "strategy": (COORDINATOR, "no effect on the device's guarantee"),
    "update-encoding": (COORDINATOR, "no effect on the device's guarantee"),
    "dropout-rate": ("simulation only", "a device refuses a run that sets it"),
    "simulated-profiles": ("simulation only", "ignored by a device"),
    "progress-seconds": (COORDINATOR, "how often the device logs its progress, locally"),
    "model": (COORDINATOR, "only a model the policy's `models` names (by its text, or a path "
              "pinned to its sha256)"),
    "quantization": (NODE, "resources, not privacy"),
    "device": (NODE, "resources, not privacy"),
    "threads": (NODE, "resources, not privacy"),
    "device-profile": (NODE, "resources, not privacy"),
    "lora-r": ("coordinator", "at most `max-lora-r`; under HetLoRA a node config may train "
               "less"),
    "lora-alpha": (COORDINATOR, "post-processing of DP gradients"),
    "lora-dropout": (COORDINATOR, "post-processing of DP gradients"),
    "lora-targets": (COORDINATOR, "which parameters DP-SGD trains; no effect on ε"),
    "lora-layers": (COORDINATOR, "which parameters DP-SGD trains; no effect on ε"),
    "frozen-cache": (NODE, "resources, not privacy"),
    "data": (OWNER, "the run config's value is ignored"),
    "seq-len": (OWNER, "the privacy unit of free text: a run must ask for the policy's "
                "`seq-len` exactly"),
    "max-eval-seqs": (COORDINATOR, "evaluation; its sums leave only with `release-stats`"),
    "eval-task": (OWNER, "the run config's value is ignored"),
    "max-task-items": (COORDINATOR, "evaluation; its counts leave only with `release-stats`"),
    "task-max-new-tokens": (COORDINATOR, "evaluation, local"),
    "completion-only-loss": (COORDINATOR, "which tokens of a record count; the record stays "
                             "the unit"),
    "local-steps": (COORDINATOR, "at most `max-local-steps`; fixed in the plan"),
    "batch-size": (COORDINATOR, "at most `max-batch-size`; fixed in the plan (q = batch / n)"),
    "micro-batch-tokens": (NODE, "resources, not privacy"),
    "lr": (COORDINATOR, "post-processing of DP gradients"),
    "optimizer": (COORDINATOR, "post-processing of DP gradients"),
    "dp": ("owner, stricter only", "false is refused unless the policy has "
           "`allow-non-dp = true` (then ε = ∞ is recorded)"),
    "target-epsilon": ("coordinator, stricter only", "σ is raised until the run's own ε is "
                       "at most `max-epsilon-per-run`; a plan past `budget-epsilon` is "
                       "refused; fixed in the plan"),
    "delta": ("coordinator, stricter only", "at most `max-delta`; fixed in the plan"),
    "noise-multiplier": ("coordinator, stricter only", "a fixed σ is raised until the run's "
                         "ε is within `max-epsilon-per-run`; past the budget it is refused; "
                         "0 is refused"),
    "clip-norm": (COORDINATOR, "σ is relative to it: no effect on ε; within 1e-3..1e3"),
    "canary-file": ("simulation only", "a device refuses a run that sets it"),
    "budget-epsilon": ("owner, stricter only", "the policy's lifetime budget; a run may ask "
                       "for a smaller one"),
    "budget-delta": ("owner, stricter only", "the policy's; a run may ask for a smaller one"),
    "state-root": (OWNER, "a device's state folder is its `--state`; the value is ignored"),
    "seed": (COORDINATOR, "seeds only the shared initial adapter (data-independent); a device's "
             "noise and sampling come from the OS"),
    "reproducible": ("simulation only", "a device refuses a run that sets it"),
    "cache-dir": (OWNER, "`<state>/cache`"),
    "partition-id": (OWNER, "policy `partition-id`"),
    "client": (OWNER, "policy `client`, default the state folder's name"),
    "state-dir": (OWNER, "`fedslm supernode --state`"),
    "num-partitions": ("simulation only", "unused"),
    "release-stats": (OWNER, "policy `release-stats`, default false"),
}


def deployment_table() -> str:
    """docs/privacy.md's table: every configuration key, who decides it on a device."""
    from contracts.config import SERVER

    rows = ["| key | who decides on a device | how |", "|---|---|---|"]
    for name, key in SCHEMA.items():
        who, how = (SERVER_SIDE, "") if key.scope == SERVER else DECIDES[name]
        rows.append(f"| `{name}` | {who} | {how} |")
    return "\n".join(rows)
