"""Every configuration key, declared once: default, type, check, scope and help.

Defaults, validation (a SuperNode's node config included, by the same rules), the keys
a node may set, the client's settings, pyproject's [tool.flwr.app.config] (kept equal
by a test) and the table in docs/configuration.md all come from SCHEMA.

Scopes: `server` keys are read by the coordinator only; `client` keys travel to every
client in each message; `node` keys travel too, and a SuperNode's own node config may
override them (its data, its device, its privacy budget); `node-only` keys exist only in
a node config.

A run's config is resolved by `resolve()`: defaults, then a TOML file, then flags, or,
to resume a run, that run's own config.json.
"""

from __future__ import annotations

import json
import math
import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from contracts.adapter import STRATEGIES
from contracts.codec import ENCODINGS
from contracts.errors import FedslmError

QUANTIZATIONS = ("auto", "nf4", "int8", "none")
OPTIMIZERS = ("adamw", "sgd")
SERVER, CLIENT, NODE, NODE_ONLY = "server", "client", "node", "node-only"


class ConfigError(FedslmError):
    """A configuration key or value that cannot be used."""


Check = Callable[[Any], str | None]  # the problem with a value, or None


def positive(v: Any) -> str | None:
    return None if 0 < v < math.inf else "must be > 0 and finite"


def non_negative(v: Any) -> str | None:
    return None if 0 <= v < math.inf else "must be >= 0 and finite"


def fraction(v: Any) -> str | None:
    return None if 0 <= v < 1 else "must be in [0, 1)"


def open_unit(v: Any) -> str | None:
    return None if 0 < v < 1 else "must be in (0, 1)"


def one_of(*choices: str) -> Check:
    def check(v: Any) -> str | None:
        return None if v in choices else f"must be one of {', '.join(choices)}"
    return check


def anything(v: Any) -> str | None:
    """For free-form values (paths, names, seeds): the area that uses them checks them
    before the run starts (a missing model or data folder, an unknown device profile)."""
    return None


def non_empty(v: Any) -> str | None:
    return None if str(v).strip() else "must not be empty"


def _device(v: Any) -> str | None:
    ok = v in ("auto", "cpu", "cuda") or (v.startswith("cuda:") and v[5:].isdigit())
    return None if ok else "must be auto, cpu, cuda or cuda:N"


def _auto_or_non_negative(v: Any) -> str | None:
    return None if v == "auto" or 0 <= v < math.inf else "must be 'auto' or >= 0 and finite"


# keys that take "auto" or a number of this type
AUTO_OR_NUMBER = {"noise-multiplier": float, "micro-batch-tokens": int,
                  "max-update-norm": float}


def _targets(v: Any) -> str | None:
    return None if [t for t in v.split(",") if t.strip()] else "names no module"




@dataclass(frozen=True)
class Key:
    name: str
    default: Any
    help: str
    check: Check = anything
    scope: str = CLIENT

    @property
    def kind(self) -> type:
        return AUTO_OR_NUMBER.get(self.name, type(self.default))


K = Key
SCHEMA: dict[str, Key] = {k.name: k for k in (
    # federation (the coordinator)
    K("num-server-rounds", 3, "federated rounds after the round-0 evaluation", positive),
    K("num-clients", 3, "clients (data partitions 0..N-1)", positive, SERVER),
    K("out", "runs", "folder that receives the run directory", non_empty, SERVER),
    K("round-timeout", 3600.0, "seconds to wait for the replies of one round", positive, SERVER),
    K("node-wait", 600.0, "seconds to wait for enough clients to connect", positive, SERVER),
    K("min-replies", 1, "fewest usable updates for a round to count (fewer: the round's "
      "training is skipped)", positive, SERVER),
    K("max-update-norm", "auto", "reject an update that moves the adapter more than this in "
      "L2 norm: `auto` = the most an honest client's DP-clipped local steps can move it "
      "(docs/deployment.md), a number fixes it, 0 = no limit", _auto_or_non_negative, SERVER),
    K("resume", "", "a run directory to go on with after its last completed round (with "
      "that run's own config)", scope=SERVER),
    K("strategy", "fedavg", f"aggregation: {', '.join(STRATEGIES)} (see docs/strategies.md)",
      one_of(*STRATEGIES)),
    K("update-encoding", "int8-delta", "how a client sends its update: `int8-delta` (the "
      "change from the adapter it received, int8 in blocks of 128 values with a float32 "
      "scale each) or `float32`", one_of(*ENCODINGS)),
    K("clients-per-round", 0, "clients sampled to train each round (0 = all connected)",
      non_negative, SERVER),
    K("eval-clients", 0, "clients that evaluate each round, the same every round (0 = all)",
      non_negative, SERVER),
    K("dropout-rate", 0.0, "simulation: chance that a client fails a round", fraction),
    K("simulated-profiles", "", "simulation: device profiles given to the clients in turn, "
      "e.g. `server-cpu,raspberry-pi-5`"),
    K("client-cpus", 1, "CPUs per simulated client (Ray); also its torch threads", positive,
      SERVER),
    K("progress-seconds", 20.0, "a client logs its progress (steps done / planned, elapsed) "
      "this often while it trains; a simulation prints every client's", positive),
    # model
    K("model", "embedded", "`embedded`, a `.gguf` file, a local model folder, or a Hugging "
      "Face id", non_empty),
    K("quantization", "auto", "frozen base: `auto`, `nf4`, `int8` or `none`",
      one_of(*QUANTIZATIONS), NODE),
    K("device", "auto", "`auto` (CUDA if present), `cpu`, `cuda`", _device, NODE),
    K("threads", 0, "torch threads per client; 0 = `client-cpus` in simulation, else the "
      "device profile's", non_negative, NODE),
    K("device-profile", "generic-cpu", "power figures and defaults of the client device "
      "(see docs/energy.md)", non_empty, NODE),
    K("lora-r", 8, "LoRA rank (under hetlora: the largest; a node may train less)",
      positive, NODE),
    K("lora-alpha", 16.0, "LoRA alpha", positive),
    K("lora-dropout", 0.0, "LoRA dropout", fraction),
    K("lora-targets", "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj",
      "modules that get a LoRA adapter, comma-separated", _targets),
    K("lora-layers", 0, "LoRA on the top N decoder layers only (0 = every layer)",
      non_negative),
    K("frozen-cache", True, "with `lora-layers` set, the frozen lower layers' outputs for "
      "the client's examples are computed once and each step runs only the top layers: the "
      "same losses and gradients, fewer FLOPs; the cache is private data and stays in the "
      "client's memory", scope=NODE),
    # data
    K("data", "embedded", "`embedded`, a `.jsonl` file, a folder, or a text file", non_empty,
      NODE),
    K("seq-len", 64, "tokens per training example", positive),
    K("max-eval-seqs", 24, "held-out sequences evaluated per client", positive),
    K("eval-task", "", "a task each client evaluates every round besides its held-out "
      "split: a `.jsonl` file of multiple-choice or short-answer items, or `plays` (the "
      "shipped task); empty: none (see README, Fine-tune for your task)", scope=NODE),
    K("max-task-items", 0, "task items evaluated per client and round, the file's first "
      "(0 = all of this client's)", non_negative),
    K("task-max-new-tokens", 32, "short-answer items: the greedy answer's length cap in "
      "tokens", positive),
    K("completion-only-loss", True, "prompt-completion and conversational records: the "
      "loss on completions and assistant turns only (false: on every token)"),
    # local training
    K("local-steps", 6, "DP-SGD steps per client and round", positive),
    K("batch-size", 16, "the expected Poisson batch (q = batch-size / examples)", positive),
    K("micro-batch-tokens", "auto", "a drawn batch goes through forward/backward at most "
      "this many tokens at a time (0 = all at once): less memory, the same update and "
      "privacy; `auto` = 512 with 16-bit compute, 64 with fp32 (a CPU without bf16)",
      _auto_or_non_negative, NODE),
    K("lr", 0.01, "learning rate", positive),
    K("optimizer", "adamw", "`adamw` or `sgd`", one_of(*OPTIMIZERS)),
    # differential privacy (per client, sample level)
    K("dp", True, "false trains without clipping or noise (ε = ∞, recorded as such)"),
    K("target-epsilon", 8.0, "the cumulative ε each client's data reaches at the end of the "
      "run; σ is derived from it", positive),
    K("delta", 1e-5, "δ of every (ε, δ) guarantee", open_unit),
    K("noise-multiplier", "auto", "`auto` derives σ from target-epsilon; a number fixes it",
      _auto_or_non_negative),
    K("clip-norm", 1.0, "per-example gradient clipping norm", positive),
    K("audit-canaries", 0, "plant this many canaries for an empirical privacy audit",
      non_negative, SERVER),
    K("canary-file", "", "set by an audit run: the canaries to plant (internal)"),
    K("central-dp", False, "add user-level DP-FedAvg on the server", scope=SERVER),
    K("central-noise-multiplier", 1.0, "z of the server's DP-FedAvg", non_negative, SERVER),
    K("central-clip-norm", 1.0, "S of the server's DP-FedAvg", positive, SERVER),
    K("budget-epsilon", 0.0, "each client's hard privacy budget (0 = none)", non_negative, NODE),
    K("budget-delta", 0.0, "each client's hard δ budget (0 = none)", non_negative, NODE),
    K("state-root", "", "folder of the clients' state (ledgers); default <run dir>/clients"),
    # reproducibility
    K("seed", 0, "seeds the shared initial adapter"),
    K("reproducible", False, "also seed Poisson sampling and DP noise (tests only)"),
    K("cache-dir", "", "model cache; default $FEDSLM_CACHE_DIR or ~/.cache/fedslm", scope=NODE),
    # a SuperNode's own (never in a run config)
    K("partition-id", 0, "which data partition this node holds", non_negative, NODE_ONLY),
    K("client", "", "this node's client name (default: from its data)", scope=NODE_ONLY),
    K("state-dir", "", "this node's state folder (ledger, model cache)", scope=NODE_ONLY),
    K("num-partitions", 0, "set by Flower's simulation engine (unused)", scope=NODE_ONLY),
    K("release-stats", False, "send the server this device's timings, energy, memory and "
      "held-out evaluation sums: outside DP, the data owner's choice (docs/privacy.md; "
      "a simulation's nodes: true)", scope=NODE_ONLY),
)}

RUN_KEYS = tuple(k for k, key in SCHEMA.items() if key.scope != NODE_ONLY)
NODE_KEYS = tuple(k for k, key in SCHEMA.items() if key.scope in (NODE, NODE_ONLY))
DEFAULTS: dict[str, Any] = {k: SCHEMA[k].default for k in RUN_KEYS}


def coerce(name: str, value: Any) -> Any:
    """`value` as the key's type; ConfigError naming the key when it is not one."""
    key = SCHEMA.get(name)
    if key is None:
        raise ConfigError(f"unknown config key {name!r} (known keys: {', '.join(RUN_KEYS)})")
    if name in AUTO_OR_NUMBER and str(value) == "auto":
        return "auto"
    kind = key.kind
    try:
        if kind is bool:
            if isinstance(value, str):
                if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError
                return value.lower() in ("true", "1", "yes")
            return bool(value)
        if kind is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value)
        if kind is float:
            number = float(value)
            if math.isnan(number):
                raise ValueError
            return number
        return str(value)
    except (TypeError, ValueError):
        raise ConfigError(f"config key {name!r} needs a {kind.__name__}, got {value!r}") from None


def _check(name: str, value: Any, where: str = "config key") -> None:
    problem = SCHEMA[name].check(value)
    if problem:
        raise ConfigError(f"{where} {name!r} {problem}, got {value!r}")


def validate(config: dict[str, Any]) -> dict[str, Any]:
    """A complete, typed copy of a run config (defaults filled in); ConfigError if invalid."""
    out = dict(DEFAULTS)
    for name, value in config.items():
        if name in SCHEMA and SCHEMA[name].scope == NODE_ONLY:
            raise ConfigError(f"config key {name!r} belongs in a SuperNode's node config")
        out[name] = coerce(name, value)
    for name in RUN_KEYS:
        _check(name, out[name])
    if out["min-replies"] > out["num-clients"]:
        raise ConfigError(f"config key 'min-replies' ({out['min-replies']}) must not exceed "
                          f"'num-clients' ({out['num-clients']})")
    if out["central-dp"] and out["strategy"] == "hetlora":
        raise ConfigError("central-dp needs updates of one shape: use strategy fedavg or "
                          "ffa-lora with it")
    return out


def validate_node(node_config: dict[str, Any]) -> dict[str, Any]:
    """The keys of a SuperNode's node config that fedslm uses, typed and checked by the
    same rules as a run config; ConfigError naming the key otherwise. A run key a node
    may not set (the run's DP settings among them) is refused, not silently ignored;
    keys fedslm does not know are Flower's or the user's business and are left out."""
    out = {}
    for name, value in node_config.items():
        if name in SCHEMA and name not in NODE_KEYS:
            raise ConfigError(f"node config key {name!r} is set by the server's run config; "
                              f"a node may set {', '.join(NODE_KEYS)}")
        if name not in NODE_KEYS:
            continue
        out[name] = coerce(name, value)
        _check(name, out[name], "node config key")
    return out


def for_clients(config: dict[str, Any]) -> dict[str, Any]:
    """What the server sends to every client: the client and node keys."""
    return {k: v for k, v in config.items() if k in SCHEMA and SCHEMA[k].scope != SERVER}


def read_toml(path: str | Path, what: str = "config file") -> dict[str, Any]:
    try:
        return tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{what} not found: {path}") from None
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"cannot read {what} {path}: {exc}") from None


def load_file(path: str | Path) -> dict[str, Any]:
    """Flat `key = value` pairs from a TOML scenario file (a [config] table also works)."""
    data = read_toml(path)
    if "grid" in data or "extra" in data:
        raise ConfigError(f"{path} is a sweep (it has a [grid]): run fedslm sweep --config {path}")
    return dict(data.get("config", data))


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set expects key=value, got {pair!r}")
        out[key.strip()] = value.strip()
    return out


def saved_config(run_dir: str | Path) -> dict[str, Any]:
    """The validated config of an earlier run (its config.json), set to resume it."""
    path = Path(run_dir).expanduser().resolve() / "config.json"
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"cannot resume: {path} not found (not a run directory?)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"cannot resume: {path} is unreadable ({exc})") from None
    if not isinstance(saved, dict):
        raise ConfigError(f"cannot resume: {path} is not a JSON object")
    saved = {k: v for k, v in saved.items() if k in DEFAULTS}
    return validate({**saved, "resume": str(path.parent)})


def resolve(file: str | Path | None = None, flags: dict[str, Any] | None = None,
            run_config: dict[str, Any] | None = None) -> dict[str, Any]:
    """A run's config: defaults -> file -> flags (or Flower's run config); when the
    result names a run to `resume`, that run's own config (nothing else may be given)."""
    given = {**(load_file(file) if file else {}), **(run_config or {}), **(flags or {})}
    resume = given.get("resume")
    if resume:
        if run_config is None and set(given) != {"resume"}:
            raise ConfigError("--resume uses the run's own config: give no other settings")
        return saved_config(resume)
    return validate(given)


def markdown_table() -> str:
    """The configuration table of docs/configuration.md."""
    rows = ["| key | default | scope | meaning |", "|---|---|---|---|"]
    for key in SCHEMA.values():
        default = json.dumps(key.default) if isinstance(key.default, str) else key.default
        if isinstance(key.default, bool):
            default = str(key.default).lower()
        rows.append(f"| `{key.name}` | {default} | {key.scope} | {key.help} |")
    return "\n".join(rows)
