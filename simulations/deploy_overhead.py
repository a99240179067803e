"""The deployed federation's per-round overhead: the README's walk-through (docs/deployment.md)
on this machine, a SuperLink and two SuperNodes on 127.0.0.1 with TLS and node
authentication, each device under its own policy (the owner releases its timings).

    python -m simulations.deploy_overhead [--rounds 2] [--set key=value ...]

Overhead of a round = 1 - (the slowest client's training + evaluation seconds) / the
round's wall time, from the run's metrics.jsonl. Everything runs in a temporary folder
outside the project and is stopped at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Walkthrough:
    def __init__(self, root: Path) -> None:
        self.root, self.port = root, _port()
        self.env = {**os.environ, "FLWR_HOME": str(root / "superlink" / "flwr"),
                    "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1",
                    "HF_HUB_OFFLINE": "1"}
        self.procs: list[subprocess.Popen] = []

    def fedslm(self, *args: str, log: str) -> None:
        out = open(self.root / f"{log}.log", "ab")  # noqa: SIM115 (closed with the process)
        self.procs.append(subprocess.Popen([str(BIN / "fedslm"), *args], stdout=out,
                                           stderr=subprocess.STDOUT, env=self.env,
                                           start_new_session=True))

    def flwr(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run([str(BIN / "flwr"), *args], capture_output=True, text=True,
                              env=self.env, timeout=timeout)

    def start(self) -> None:
        certs = self.root / "certs"
        subprocess.run([str(BIN / "fedslm"), "certs", str(certs), "--address", "127.0.0.1",
                        "--nodes", "2"], check=True, env=self.env, capture_output=True)
        self.fedslm("superlink", "--certs", str(certs), "--address", "127.0.0.1", "--port",
                    str(self.port), "--state", str(self.root / "superlink"), log="superlink")
        self._until(lambda: self.flwr("supernode", "list", "fedslm").returncode == 0)
        for i in (1, 2):
            self.flwr("supernode", "register", str(certs / "nodes" / f"node-{i}.pub"),
                      "fedslm")
            policy = self.root / f"device-{i}-policy.toml"
            # this machine's own figures: the nodes release their timings
            policy.write_text(f"budget-epsilon = 100.0\npartition-id = {i - 1}\n"
                              "release-stats = true\n")
            self.fedslm("supernode", "--ca", str(certs / "ca.crt"), "--key",
                        str(certs / "nodes" / f"node-{i}.key"), "--superlink",
                        f"127.0.0.1:{self.port}", "--port", str(_port()), "--state",
                        str(self.root / f"device-{i}"), "--policy", str(policy),
                        "--node-config", "device-profile='laptop'", log=f"device-{i}")
        self._until(lambda: self._online() == 2)

    def _online(self) -> int:
        out = self.flwr("supernode", "list", "fedslm", "--format", "json")
        return sum(1 for n in json.loads(out.stdout or "{}").get("nodes", [])
                   if n.get("status") == "online")

    @staticmethod
    def _until(ready, timeout: float = 300, every: float = 1.0) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            if time.monotonic() > deadline:
                raise TimeoutError("the walk-through's processes did not come up")
            time.sleep(every)

    def run(self, config: dict[str, Any]) -> Path:
        out = self.root / "runs"
        settings = {"num-clients": 2, "out": str(out), **config}
        run_config = " ".join(f"{k}={json.dumps(v)}" for k, v in settings.items())
        done = self.flwr("run", str(ROOT), "fedslm", "--run-config", run_config, timeout=600)
        if done.returncode != 0:
            raise RuntimeError("flwr run failed:\n" + (done.stdout + done.stderr)[-3000:])
        # each `flwr ls` is a Python process: poll rarely, not to steal the nodes' CPU
        self._until(lambda: self._status().startswith("finished"), timeout=7200, every=15)
        logs = self.flwr("log", self._run_id(), "fedslm", "--show", timeout=120)
        (self.root / "run.log").write_text(done.stdout + logs.stdout + logs.stderr)
        from contracts.rundir import run_dirs

        runs = run_dirs(out)
        if not runs:
            raise RuntimeError("the run wrote no run directory:\n" + done.stdout[-3000:])
        return runs[-1]

    def _last_run(self) -> dict[str, Any]:
        answer = self.flwr("ls", "fedslm", "--format", "json")
        runs = json.loads(answer.stdout or "{}").get("runs")
        if not runs:
            raise RuntimeError(f"flwr ls lists no run: {(answer.stdout + answer.stderr)[-2000:]}")
        return sorted(runs, key=lambda r: r["pending-at"])[-1]

    def _status(self) -> str:
        return self._last_run()["status"]

    def _run_id(self) -> str:
        return str(self._last_run()["run-id"])

    def stop(self) -> None:
        for proc in self.procs:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        for proc in self.procs:
            proc.wait(timeout=60)


def overhead(run_dir: Path) -> list[dict[str, float]]:
    from contracts.rundir import read_metrics

    rows = []
    for line in read_metrics(run_dir):
        slowest = max(((c["train_seconds"] or 0.0) + (c["eval_seconds"] or 0.0)
                       for c in line["clients"]), default=0.0)
        rows.append({"round": line["round"], "wall_s": line["round_seconds"],
                     "slowest_client_s": slowest,
                     "overhead": 1 - slowest / line["round_seconds"]})
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--set", action="append", default=[], help="run config key=value")
    p.add_argument("--keep", help="keep the walk-through's folder (logs, state) here")
    args = p.parse_args(argv)
    config: dict[str, Any] = {"num-server-rounds": args.rounds}
    for item in args.set:
        key, _, value = item.partition("=")
        config[key] = json.loads(value) if value[:1].isdigit() or value in (
            "true", "false") else value
    with tempfile.TemporaryDirectory(prefix="fedslm-walk-") as tmp:
        root = Path(args.keep) if args.keep else Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        walk = Walkthrough(root)
        try:
            walk.start()
            started = time.perf_counter()
            rows = overhead(walk.run(config))
            total = time.perf_counter() - started
        finally:
            walk.stop()
    print(f"flwr run wall {total:.1f} s")
    print("| round | wall s | slowest client s | overhead |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['round']} | {r['wall_s']:.1f} | {r['slowest_client_s']:.1f} | "
              f"{r['overhead']:.1%} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
