"""The Flower ServerApp: rounds of train + federated evaluation over LoRA adapters
(the rounds: server/engine.py; the aggregation: server/strategies.py)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from contracts.config import resolve
from contracts.rundir import new_run_dir
from server.engine import FederationError, TooFewUpdates, run_federation

__all__ = ["FederationError", "TooFewUpdates", "app", "make_server_app"]


def make_server_app(config: dict[str, Any], run_dir: Path,
                    echo: Callable[[str], None] = print) -> ServerApp:
    """A ServerApp bound to a resolved config (used by `fedslm simulate`)."""
    server_app = ServerApp()

    @server_app.main()
    def _main(grid: Grid, context: Context) -> None:
        run_federation(grid, config, run_dir, echo, simulation=True)

    return server_app


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Entry point for `flwr run .`: the config comes from the run config; with
    `resume` = a run directory, that run's own config and checkpoint."""
    flwr_log = logging.getLogger("flwr")  # Flower streams its own logger to `flwr run`
    config = resolve(run_config=dict(context.run_config))
    run_dir = Path(config["resume"]) if config["resume"] else new_run_dir(config["out"])
    flwr_log.info("fedslm run directory: %s", run_dir)
    run_federation(grid, config, run_dir, echo=flwr_log.info)
    flwr_log.info("fedslm run directory: %s", run_dir)
