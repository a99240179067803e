"""Building blocks for tests: settings for one client round on local files."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from client.settings import ClientSettings
from contracts.config import DEFAULTS


def client_settings(model: Path, data: Path, state: Path, **overrides: Any) -> ClientSettings:
    config = {**DEFAULTS, "model": str(model), "data": str(data), "seq-len": 32,
              "batch-size": 4, "local-steps": 2, "num-server-rounds": 3, "threads": 1,
              "reproducible": False, "state-root": str(state), "server-round": 1,
              "run-id": "test-run"}
    config.update({k.replace("_", "-"): v for k, v in overrides.items()})
    node = {"partition-id": config.pop("partition-id", 0),
            **({"release-stats": config.pop("release-stats")} if "release-stats" in config
               else {})}
    return ClientSettings.from_records(config, node)
