"""Keep every process of a local federation on this machine (127.0.0.1, no hub).

Ray binds to the machine's non-loopback address unless
RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, and its dashboard probes cloud-metadata
addresses unless $HOME/ray_bootstrap_config.yaml exists; Flower sends telemetry
and checks for updates; transformers and huggingface_hub try the hub. These
settings rely on Ray internals (Ray is pinned by flwr 1.42, and a test checks
the addresses Ray binds).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from client.model import default_cache_dir


def loopback_environ(cache_dir: Path, allow_hub: bool = False) -> dict[str, str]:
    home = Path.home()
    env = {
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        "RAY_USAGE_STATS_ENABLED": "0",
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
        "TRANSFORMERS_VERBOSITY": "error",
        "TOKENIZERS_PARALLELISM": "false",
        "RAY_DEDUP_LOGS": "0",
        "PYTHONWARNINGS": "ignore::DeprecationWarning,ignore::FutureWarning",
        "FEDSLM_CACHE_DIR": str(cache_dir),
        "HF_HOME": os.environ.get("HF_HOME", str(home / ".cache" / "huggingface")),
        "HOME": str(cache_dir / "ray-home"),  # holds ray_bootstrap_config.yaml
    }
    if not allow_hub:
        env["HF_HUB_OFFLINE"] = "1"
    return env


def apply_loopback() -> dict[str, str]:
    """Set the environment for this process and the Ray processes it starts.

    Must run before `ray` is imported: Ray reads some of these at import time.
    """
    if "ray" in sys.modules and os.environ.get("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER") != "0":
        raise RuntimeError("ray was imported before the loopback settings were applied")
    cache_dir = default_cache_dir()
    env = loopback_environ(cache_dir, allow_hub=os.environ.get("FEDSLM_ALLOW_HUB") == "1")
    ray_home = Path(env["HOME"])
    ray_home.mkdir(parents=True, exist_ok=True)
    (ray_home / "ray_bootstrap_config.yaml").write_text("{}\n")
    os.environ.update(env)
    return env
