"""`fedslm sweep`: run a grid of simulations and tabulate them.

A sweep file is a scenario file (flat `key = value` settings shared by every run) with
a `[grid]` table of lists, every combination of which is one run, and optionally
`[[extra]]` tables, each one more run (e.g. a no-DP baseline). Each run is one
`fedslm simulate` in its own process (a fresh Ray). Written to <out>/sweep-<time>/:
runs/, sweep.csv, sweep.md and report/ (the runs' plots and their trade-off).
"""

from __future__ import annotations

import csv
import itertools
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from contracts.config import ConfigError, read_toml, validate
from contracts.wire import format_epsilon
from simulations.report import load_run, summary, write_report

COLUMNS = ["epsilon", "ppl_final", "token_accuracy", "energy_kj", "mb_up", "mb_down",
           "round_seconds", "peak_rss_mb", "wall_minutes"]


def read_sweep(path: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(settings shared by every run, each run's own settings)."""
    data = read_toml(path, "sweep file")
    grid, extra = data.pop("grid", None), data.pop("extra", [])
    if not isinstance(grid, dict) or not grid or not all(
            isinstance(v, list) and v for v in grid.values()):
        raise ConfigError(f"{path} needs a [grid] table of non-empty lists")
    base = dict(data.get("config", data))
    runs = points(grid) + [dict(x) for x in extra]
    for run in runs:
        validate({**base, **run})  # every run's settings are checked before any starts
    return base, runs


def points(grid: dict[str, list[Any]]) -> list[dict[str, Any]]:
    keys = list(grid)
    return [dict(zip(keys, values, strict=True)) for values in itertools.product(*grid.values())]


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return repr(value)


def run_point(settings: dict[str, Any], folder: Path, index: int) -> tuple[Path | None, float]:
    """One `fedslm simulate` run in its own process: (run directory or None, seconds)."""
    config = folder / "points" / f"{index:03d}.toml"
    config.parent.mkdir(parents=True, exist_ok=True)
    config.write_text("".join(f"{k} = {_toml_value(v)}\n" for k, v in settings.items()))
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "fedslm.cli", "simulate", "--config",
                           str(config), "--out", str(folder / "runs")],
                          capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - start
    (folder / "points" / f"{index:03d}.log").write_text(done.stdout + done.stderr)
    lines = done.stdout.strip().splitlines()
    run_dir = Path(lines[-1]) if done.returncode == 0 and lines else None
    return run_dir, seconds


def sweep(path: Path, out: Path, echo=print) -> Path:
    base, runs = read_sweep(path)
    keys = list(dict.fromkeys(k for run in runs for k in run))
    folder = Path(out).resolve() / time.strftime("sweep-%Y%m%d-%H%M%S")
    folder.mkdir(parents=True)
    rows, run_dirs, labels = [], [], []
    for i, point in enumerate(runs):
        label = " ".join(f"{k}={v}" for k, v in point.items())
        echo(f"sweep {i + 1}/{len(runs)}: {label}")
        run_dir, seconds = run_point({**base, **point}, folder, i)
        row: dict[str, Any] = {**point, "run": "", "wall_minutes": seconds / 60}
        if run_dir is None:
            row["run"] = f"failed (see points/{i:03d}.log)"
        else:
            row.update(_measures(load_run(run_dir)))
            row["run"] = run_dir.name
            run_dirs.append(run_dir)
            labels.append(label)
        rows.append(row)
        echo("  " + _describe(row))
    header = [*keys, *COLUMNS, "run"]
    with open(folder / "sweep.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, header, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    (folder / "sweep.md").write_text(markdown(rows, header))
    if run_dirs:
        write_report(run_dirs, folder / "report", labels)
    echo(str(folder))
    return folder


def _measures(run: dict[str, Any]) -> dict[str, Any]:
    """The table's figures of one run: its summary, the mean training-round time and the
    largest client peak memory."""
    out = {k: v for k, v in summary(run).items() if k in COLUMNS}
    trained = [r["round_seconds"] for r in run["rounds"] if r["round"] > 0]
    out["round_seconds"] = sum(trained) / len(trained) if trained else None
    out["peak_rss_mb"] = max((c.get("peak_rss_mb") or 0 for r in run["rounds"]
                              for c in r["clients"]), default=None)
    return out


def _fmt(key: str, value: Any) -> str:
    if key == "epsilon":
        return format_epsilon(value)
    return f"{value:.2f}" if isinstance(value, float) else str(value)


def _describe(row: dict[str, Any]) -> str:
    return "  ".join(f"{k} {_fmt(k, row[k])}" for k in COLUMNS if k in row)


def markdown(rows: list[dict[str, Any]], header: list[str]) -> str:
    titles = {"epsilon": "ε", "ppl_final": "final ppl", "token_accuracy": "token acc",
              "energy_kj": "energy kJ", "mb_up": "MB up", "mb_down": "MB down",
              "round_seconds": "s/round", "peak_rss_mb": "peak MB", "wall_minutes": "wall min"}
    out = ["| " + " | ".join(titles.get(h, h) for h in header) + " |",
           "|" + "---|" * len(header)]
    out += ["| " + " | ".join(_fmt(h, row.get(h)) if h in COLUMNS else str(row.get(h, ""))
                              for h in header) + " |" for row in rows]
    return "\n".join(out) + "\n"
