"""`flwr run .` on a local SuperLink, kept on loopback and cleaned up afterwards.

    python -m simulations.flwr_local [--supernodes N] [--run-config "k=v ..."]

Flower's own CLI starts a background local SuperLink, inherits this process's
environment, leaves the SuperLink running and exits 0 even when the run failed.
This wrapper applies the loopback settings, uses a private FLWR_HOME, turns off
runtime dependency installation, starts services from a neutral folder (the
generic `client`/`server` package names must not be shadowed by a cwd), reads
the run's final status with `flwr ls`, and stops the SuperLink it started.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

APP_DIR = Path(__file__).resolve().parents[1]
CONNECTION = "fedslm-local"


def _flower_home(cache_dir: Path) -> Path:
    home = cache_dir / "flwr-home"
    home.mkdir(parents=True, exist_ok=True)
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\naddress = ":local:"\n'
    )
    return home


def _superlink_pids() -> set[int]:
    import psutil

    pids = set()
    for p in psutil.process_iter(["cmdline"]):
        if any("flower-superlink" in part for part in (p.info["cmdline"] or [])[:2]):
            pids.add(p.pid)
    return pids


def _stop(pids: set[int]) -> None:
    import psutil

    procs = [psutil.Process(pid) for pid in pids if psutil.pid_exists(pid)]
    for proc in procs:
        proc.terminate()
    _, alive = psutil.wait_procs(procs, timeout=15)
    for proc in alive:
        proc.kill()


def run(supernodes: int, run_config: str, app_dir: Path = APP_DIR) -> int:
    from contracts.environment import apply_loopback, quiet_environ

    env = apply_loopback()
    flwr_home = _flower_home(Path(env["FEDSLM_CACHE_DIR"]))
    bin_dir = str(Path(sys.executable).parent)
    os.environ.update({**quiet_environ(), "FLWR_HOME": str(flwr_home)})  # PATH: bin_dir first
    flwr = str(Path(bin_dir) / "flwr")
    before = _superlink_pids()
    try:
        args = [flwr, "run", str(app_dir), CONNECTION, "--stream",
                "--federation-config", f"num-supernodes={supernodes}"]
        if run_config:
            args += ["--run-config", run_config]
        started = subprocess.run(args, cwd=flwr_home, check=False)
        listing = subprocess.run([flwr, "ls", CONNECTION, "--format", "json"], cwd=flwr_home,
                                 capture_output=True, text=True, check=False)
        runs = json.loads(listing.stdout or "{}").get("runs", [])
        status = runs[0]["status"] if runs else "unknown"
        print(f"flwr run status: {status}")
        return 0 if started.returncode == 0 and status == "finished:completed" else 1
    finally:
        _stop(_superlink_pids() - before)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--supernodes", type=int, default=3)
    parser.add_argument("--run-config", default="", help='e.g. "num-server-rounds=2 lr=0.005"')
    args = parser.parse_args()
    return run(args.supernodes, args.run_config)


if __name__ == "__main__":
    sys.exit(main())
