"""The run configuration: every key, its default, and validation.

One flat table of keys (Flower's run-config style). `fedslm simulate` reads it
from defaults < a TOML file < command-line flags; `flwr run .` from
pyproject's [tool.flwr.app.config] < --run-config.
"""

from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import Any

from client.codec import ENCODINGS

DEFAULTS: dict[str, Any] = {
    # federation
    "num-server-rounds": 3,
    "num-clients": 3,
    "out": "runs",
    "round-timeout": 3600.0,
    "node-wait": 600.0,
    "min-replies": 1,
    "max-update-norm": 0.0,
    "resume": "",
    "strategy": "fedavg",
    "update-encoding": "int8-delta",
    "clients-per-round": 0,
    "eval-clients": 0,
    "dropout-rate": 0.0,
    "simulated-profiles": "",
    "client-cpus": 1,
    # model
    "model": "embedded",
    "quantization": "auto",
    "device": "auto",
    "threads": 0,
    "device-profile": "generic-cpu",
    "lora-r": 8,
    "lora-alpha": 16.0,
    "lora-dropout": 0.0,
    "lora-targets": "q_proj,v_proj",
    # data
    "data": "embedded",
    "seq-len": 64,
    "max-eval-seqs": 24,
    # local training
    "local-steps": 10,
    "batch-size": 16,
    "micro-batch-tokens": 512,
    "lr": 0.01,
    "optimizer": "adamw",
    # differential privacy (per client, sample level)
    "dp": True,
    "target-epsilon": 8.0,
    "delta": 1e-5,
    "noise-multiplier": "auto",
    "clip-norm": 1.0,
    "audit-canaries": 0,
    "canary-file": "",
    "central-dp": False,
    "central-noise-multiplier": 1.0,
    "central-clip-norm": 1.0,
    "budget-epsilon": 0.0,
    "budget-delta": 0.0,
    "state-root": "",
    # reproducibility
    "seed": 0,
    "reproducible": False,
    "cache-dir": "",
}

POSITIVE = {"num-server-rounds", "num-clients", "client-cpus", "lora-r", "lora-alpha", "seq-len",
            "max-eval-seqs", "local-steps", "batch-size", "lr", "target-epsilon", "clip-norm",
            "round-timeout", "central-clip-norm", "node-wait", "min-replies"}
CHOICES = {"quantization": ("auto", "nf4", "int8", "none"), "optimizer": ("adamw", "sgd"),
           "strategy": ("fedavg", "ffa-lora", "hetlora"),
           "update-encoding": ENCODINGS}


class ConfigError(ValueError):
    """A configuration key or value that cannot be used."""


def _coerce(key: str, value: Any) -> Any:
    if key not in DEFAULTS:
        known = ", ".join(sorted(DEFAULTS))
        raise ConfigError(f"unknown config key {key!r} (known keys: {known})")
    default = DEFAULTS[key]
    if key == "noise-multiplier":
        if str(value) == "auto":
            return "auto"
        default = 0.0
    try:
        if isinstance(default, bool):
            if isinstance(value, str):
                if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError
                return value.lower() in ("true", "1", "yes")
            return bool(value)
        if isinstance(default, int):
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value)
        if isinstance(default, float):
            return float(value)
        return str(value)
    except (TypeError, ValueError):
        kind = type(default).__name__
        raise ConfigError(f"config key {key!r} needs a {kind}, got {value!r}") from None


def validate(config: dict[str, Any]) -> dict[str, Any]:
    """A complete, typed copy of `config` (defaults filled in); ConfigError if invalid."""
    out = dict(DEFAULTS)
    for key, value in config.items():
        out[key] = _coerce(key, value)
    for key in POSITIVE:
        if out[key] <= 0:
            raise ConfigError(f"config key {key!r} must be > 0, got {out[key]!r}")
    for key, choices in CHOICES.items():
        if out[key] not in choices:
            raise ConfigError(f"config key {key!r} must be one of {', '.join(choices)}, "
                              f"got {out[key]!r}")
    for key in ("budget-epsilon", "budget-delta", "central-noise-multiplier", "audit-canaries",
                "max-update-norm", "clients-per-round", "eval-clients", "micro-batch-tokens"):
        if out[key] < 0:
            raise ConfigError(f"config key {key!r} must be >= 0, got {out[key]!r}")
    if out["min-replies"] > out["num-clients"]:
        raise ConfigError(f"config key 'min-replies' ({out['min-replies']}) must not exceed "
                          f"'num-clients' ({out['num-clients']})")
    if not 0 <= out["dropout-rate"] < 1:
        raise ConfigError("config key 'dropout-rate' must be in [0, 1)")
    if out["central-dp"] and out["strategy"] == "hetlora":
        raise ConfigError("central-dp needs updates of one shape: use strategy fedavg or "
                          "ffa-lora with it")
    if not 0 < out["delta"] < 1:
        raise ConfigError(f"config key 'delta' must be in (0, 1), got {out['delta']!r}")
    if out["noise-multiplier"] != "auto" and out["noise-multiplier"] < 0:
        raise ConfigError("config key 'noise-multiplier' must be 'auto' or >= 0")
    if not 0 <= out["lora-dropout"] < 1:
        raise ConfigError("config key 'lora-dropout' must be in [0, 1)")
    if not [t for t in out["lora-targets"].split(",") if t.strip()]:
        raise ConfigError("config key 'lora-targets' names no module")
    return out


def read_toml(path: str | Path, what: str = "config file") -> dict[str, Any]:
    try:
        return tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{what} not found: {path}") from None
    except (OSError, tomllib.TOMLDecodeError) as exc:
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


def resume_config(run_dir: str | Path) -> dict[str, Any]:
    """The validated config of an earlier run, set to resume it."""
    path = Path(run_dir).expanduser().resolve() / "config.json"
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"cannot resume: {path} not found (not a run directory?)") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"cannot resume: {path} is unreadable ({exc})") from None
    saved = {k: v for k, v in saved.items() if k in DEFAULTS}
    return validate({**saved, "resume": str(path.parent)})
