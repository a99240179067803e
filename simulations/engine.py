"""`fedslm simulate`: a federation on Flower's simulation engine (Ray), on one machine."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from client import tasks
from client.base_model import ModelError, check_lora_targets, check_model, prepare_base
from client.data import DataError, partitions
from client.profiles import profile
from contracts.config import resolve
from contracts.environment import apply_loopback
from contracts.rundir import new_run_dir
from contracts.wire import format_epsilon
from server.engine import RunState
from simulations import canaries

log = logging.getLogger("fedslm")


def preflight(config: dict[str, Any]) -> None:
    """Fail fast, before Ray starts, on data and model problems a user can fix."""
    profile(config["device-profile"])
    parts = partitions(config["data"])
    if config["num-clients"] > len(parts):
        raise DataError(
            f"num-clients={config['num-clients']} but data {config['data']!r} has only "
            f"{len(parts)} client partitions"
        )
    tasks.check(config["eval-task"])
    cache = Path(config["cache-dir"]) if config["cache-dir"] else None
    source = prepare_base(config["model"], cache)  # builds the cache once, not per client
    check_model(source)
    check_lora_targets(source, [t.strip() for t in config["lora-targets"].split(",")])


def simulate(overrides: dict[str, Any], echo: Callable[[str], None] = print,
             client_app: Any = None, file: str | Path | None = None) -> Path:
    """Run a local federation; returns the run directory. The config is resolved from
    the defaults, `file` and `overrides` (contracts.config.resolve). `echo` receives the
    summary lines; `client_app` replaces fedslm's ClientApp (tests use one that misbehaves)."""
    config = resolve(file=file, flags=overrides)
    if config["resume"]:
        run_dir = Path(config["resume"])
        RunState.load(run_dir)  # fail now, not inside the engine
    apply_loopback()
    preflight(config)
    if config["threads"] == 0:
        config["threads"] = config["client-cpus"]
    if not config["resume"]:
        run_dir = new_run_dir(config["out"])
        if config["audit-canaries"]:
            config["canary-file"] = str(canaries.plant(config["audit-canaries"], run_dir))
    echo(f"fedslm: {config['num-clients']} clients, {config['num-server-rounds']} rounds, "
         f"run directory {run_dir}")

    import torch
    from flwr.simulation import run_simulation

    from client.app import app as fedslm_client_app
    from server.app import make_server_app

    backend = {
        "client_resources": {"num_cpus": config["client-cpus"],
                             "num_gpus": 1.0 if torch.cuda.is_available() else 0.0},
        "init_args": {"num_cpus": max(os.cpu_count() or 1, config["client-cpus"]),
                      "include_dashboard": False, "logging_level": "ERROR"},
    }
    run_simulation(server_app=make_server_app(config, run_dir, echo),
                   client_app=client_app or fedslm_client_app,
                   num_supernodes=config["num-clients"], backend_config=backend)
    if config["audit-canaries"]:
        result = canaries.score(run_dir, config)
        eps = result["epsilon_accountant"]
        echo(f"empirical audit: AUC {result['auc']:.3f}, TPR@1%FPR "
             f"{result['tpr_at_1pct_fpr']:.3f}, exposure {result['exposure_mean']:.2f} bits, "
             f"ε lower bound {result['epsilon_lower_bound']:.2f} (95%, at most "
             f"{result['epsilon_ceiling']:.2f} with {result['canaries']} canaries) vs "
             "accountant ε " + format_epsilon(eps))
    echo(str(run_dir))
    return run_dir


__all__ = ["simulate", "preflight", "ModelError", "DataError"]
