"""The one place that says how a fedslm process stays quiet and on this machine.

- Flower sends telemetry and checks for updates unless told not to; `flwr run`
  installs the app's dependencies with `uv sync` (a multi-GB CUDA torch) unless told not to.
- transformers and huggingface_hub try the hub unless HF_HUB_OFFLINE=1.
- Ray (simulation) binds to the machine's non-loopback address unless
  RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, and its dashboard probes cloud-metadata
  addresses unless $HOME/ray_bootstrap_config.yaml exists. These rely on Ray internals
  (Ray is pinned by flwr 1.42; tests/test_simulation.py checks the addresses Ray binds).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

QUIET: dict[str, str] = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "TRANSFORMERS_VERBOSITY": "error",
    "TOKENIZERS_PARALLELISM": "false",
    "PYTHONWARNINGS": "ignore::DeprecationWarning,ignore::FutureWarning",
}
RAY: dict[str, str] = {
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_DEDUP_LOGS": "0",
}
ALLOW_HUB = "FEDSLM_ALLOW_HUB"  # =1: a Hugging Face id may be downloaded
SIMULATION = "FEDSLM_SIMULATION"  # =1 in a local simulation's processes


def default_cache_dir() -> Path:
    if os.environ.get("FEDSLM_CACHE_DIR"):
        return Path(os.environ["FEDSLM_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "fedslm"


def hub_setting() -> dict[str, str]:
    """HF_HUB_OFFLINE=1 unless the user allowed the hub (or set it themselves)."""
    if os.environ.get(ALLOW_HUB) == "1":
        return {}
    return {"HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1")}


def quiet_environ() -> dict[str, str]:
    """The process environment for Flower's processes (SuperLink, SuperNode, `flwr run`)
    and the apps they start: the current one, quiet, offline, with this Python's
    scripts first on PATH (Flower starts flower-superexec from PATH)."""
    bin_dir = str(Path(sys.executable).parent)
    return {**os.environ, **QUIET, **hub_setting(),
            "PATH": bin_dir + os.pathsep + os.environ.get("PATH", "")}


def loopback_environ(cache_dir: Path) -> dict[str, str]:
    """What a local simulation sets for itself and its Ray processes."""
    return {
        **QUIET, **RAY, **hub_setting(),
        "FEDSLM_CACHE_DIR": str(cache_dir),
        SIMULATION: "1",  # the clients' progress is shown by the engine, not each client
        "HF_HOME": os.environ.get("HF_HOME", str(Path.home() / ".cache" / "huggingface")),
        "HOME": str(cache_dir / "ray-home"),  # holds ray_bootstrap_config.yaml
    }


def apply_loopback() -> dict[str, str]:
    """Set the loopback environment for this process and the Ray processes it starts.
    Must run before `ray` is imported: Ray reads some of these at import time."""
    if "ray" in sys.modules and os.environ.get("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER") != "0":
        raise RuntimeError("ray was imported before the loopback settings were applied")
    env = loopback_environ(default_cache_dir())
    ray_home = Path(env["HOME"])
    ray_home.mkdir(parents=True, exist_ok=True)
    (ray_home / "ray_bootstrap_config.yaml").write_text("{}\n")
    os.environ.update(env)
    return env
