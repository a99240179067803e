"""The run directory, one reader and one writer for each file in it.

    <run>/config.json         the fully resolved configuration
    <run>/metrics.jsonl       one JSON object per round (round 0: the base model)
    <run>/adapter/            the final global adapter in PEFT's format
    <run>/checkpoint/         state.json + round-<n>.safetensors of the last completed round
    <run>/clients/<client>/   a simulated client's state: its ledger (ledger.sqlite), its
                              progress in the round it trains (progress.json) ...
    <run>/server/ledger.sqlite  the server's user-level (central DP) ledger
    <run>/audit/              an empirical audit's canaries and result
    <run>/report/             `fedslm report`'s page and plots
JSON holds no Infinity or NaN: they are written as null (ε = ∞ is null, see wire.py).
"""

from __future__ import annotations

import json
import math
import os
import secrets
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from contracts.errors import FedslmError

CONFIG = "config.json"
METRICS = "metrics.jsonl"
ADAPTER = "adapter"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
CHECKPOINT = "checkpoint"
CHECKPOINT_STATE = "state.json"
CLIENTS = "clients"
LEDGER_FILE = "ledger.sqlite"
PROGRESS_FILE = "progress.json"  # a client's progress in the round it is training
SERVER_LEDGER = ("server", LEDGER_FILE)
SERVER_CLIENT = "server:user-level"  # the client name of the server's central-DP entries
REPORT = "report"
AUDIT = "audit"  # an empirical audit's canaries.json (planted) and empirical.json (result)
CANARIES = "canaries.json"
EMPIRICAL = "empirical.json"
LEDGERS = "ledgers"  # config.json: "local" (a simulation's, under the run) or "on-devices"
# Each round's line has at least these; each of its clients' rows at least these.
ROUND_KEYS = ("round", "eval_loss", "perplexity", "token_accuracy", "epsilon", "delta",
              "round_seconds", "bytes_up", "bytes_down", "clients")
CLIENT_KEYS = ("client", "status", "epsilon", "num_examples", "train_seconds", "energy_j",
               "energy_method", "peak_rss_mb", "bytes_up")


class RunDirError(FedslmError):
    """A run directory (or one of its files) that cannot be read as one."""


class CheckpointError(RunDirError):
    """A run directory that cannot be resumed."""


def finite(value: Any) -> Any:
    """`value` with every inf or NaN float replaced by None (for strict JSON)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [finite(v) for v in value]
    return value


def new_run_dir(out: str | Path) -> Path:
    run_id = time.strftime("%Y%m%d-%H%M%S") + "-" + secrets.token_hex(2)
    path = Path(out).expanduser().resolve() / run_id
    path.mkdir(parents=True)
    private_dir(path / CLIENTS)
    return path


def run_dirs(out: str | Path) -> list[Path]:
    """The run directories in `out`, oldest first (other files there are skipped)."""
    folder = Path(out)
    return sorted(p for p in folder.iterdir() if (p / CONFIG).is_file()) \
        if folder.is_dir() else []


def private_dir(path: Path) -> Path:
    """`path`, created if missing with mode 0700 (a client's state: its ledger, progress,
    cached activations of its private data)."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    return path


def atomic_write(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_json(path: Path, data: Any) -> None:
    atomic_write(path, (json.dumps(finite(data), indent=2) + "\n").encode())


def _read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RunDirError(f"{path} not found (not a fedslm run directory?)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RunDirError(f"{what} {path} is unreadable ({exc})") from None


# config.json
def write_config(run_dir: Path, config: dict[str, Any]) -> None:
    write_json(Path(run_dir) / CONFIG, config)


def read_config(run_dir: Path) -> dict[str, Any]:
    config = _read_json(Path(run_dir) / CONFIG, "run config")
    if not isinstance(config, dict):
        raise RunDirError(f"{Path(run_dir) / CONFIG} is not a JSON object")
    return config


# metrics.jsonl
def append_metrics(run_dir: Path, line: dict[str, Any]) -> None:
    with open(Path(run_dir) / METRICS, "a", encoding="utf-8") as f:
        f.write(json.dumps(finite(line), allow_nan=False) + "\n")
        f.flush()
        os.fsync(f.fileno())


def read_metrics(run_dir: Path, check: bool = False) -> list[dict[str, Any]]:
    """The rounds of a run. With `check`, RunDirError unless there is at least one
    round and every line has the contract's keys (ROUND_KEYS, CLIENT_KEYS)."""
    path = Path(run_dir) / METRICS
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise RunDirError(f"{path} not found (not a fedslm run directory?)") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise RunDirError(f"{path} is unreadable ({exc})") from None
    lines = []
    for number, raw in enumerate(text.splitlines(), 1):
        if not raw.strip():
            continue
        try:
            line = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise RunDirError(f"{path}:{number} is not JSON ({exc})") from None
        if check:
            _check_line(line, f"{path}:{number}")
        lines.append(line)
    if check and not lines:
        raise RunDirError(f"{path} has no rounds")
    return lines


def _check_line(line: Any, where: str) -> None:
    if not isinstance(line, dict):
        raise RunDirError(f"{where} is not a JSON object")
    missing = [k for k in ROUND_KEYS if k not in line]
    if missing:
        raise RunDirError(f"{where} lacks {', '.join(missing)}")
    for row in line["clients"]:
        missing = [k for k in CLIENT_KEYS if not isinstance(row, dict) or k not in row]
        if missing:
            raise RunDirError(f"{where}: a client row lacks {', '.join(missing)}")


def rewrite_metrics(run_dir: Path, lines: list[dict[str, Any]]) -> None:
    atomic_write(Path(run_dir) / METRICS,
                 "".join(json.dumps(finite(line)) + "\n" for line in lines).encode())


# adapter/
def save_adapter(folder: Path, arrays: dict[str, np.ndarray], config_json: str) -> None:
    """The adapter in PEFT's format, loadable with PeftModel.from_pretrained."""
    from safetensors.numpy import save

    folder.mkdir(parents=True, exist_ok=True)
    tensors = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in arrays.items()}
    atomic_write(folder / ADAPTER_WEIGHTS, save(tensors, metadata={"format": "pt"}))
    atomic_write(folder / ADAPTER_CONFIG, config_json.encode())


# checkpoint/
def save_checkpoint(run_dir: Path, state: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
    """The server's state after a completed round: adapter first, then the state that
    names it, each written atomically, so that a crash leaves the previous checkpoint."""
    from safetensors.numpy import save

    folder = Path(run_dir) / CHECKPOINT
    folder.mkdir(exist_ok=True)
    name = f"round-{state['round']}.safetensors"
    atomic_write(folder / name, save({k: np.ascontiguousarray(v) for k, v in arrays.items()}))
    write_json(folder / CHECKPOINT_STATE, {**state, "adapter": name})
    for old in folder.glob("round-*.safetensors"):
        if old.name != name:
            old.unlink()


def load_checkpoint(run_dir: Path) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """(state, global adapter) of the last completed round; metrics.jsonl is cut back to
    that round (a line written after the checkpoint belongs to a round being redone).
    CheckpointError, naming the file, when any part is missing or corrupt."""
    from safetensors.numpy import load

    run_dir = Path(run_dir)
    state_path = run_dir / CHECKPOINT / CHECKPOINT_STATE
    try:
        state = json.loads(state_path.read_text())
        weights = run_dir / CHECKPOINT / state["adapter"]
        int(state["round"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"cannot resume {run_dir}: no readable checkpoint ({exc})") from None
    try:
        arrays = load(weights.read_bytes())
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types
        raise CheckpointError(f"cannot resume {run_dir}: checkpoint {weights} is corrupt "
                              f"({type(exc).__name__}: {str(exc).splitlines()[0]})") from None
    try:
        lines = read_metrics(run_dir)
    except RunDirError as exc:
        raise CheckpointError(f"cannot resume {run_dir}: {exc}") from None
    if any(not isinstance(line, dict) or not isinstance(line.get("round"), int)
           for line in lines):
        raise CheckpointError(f"cannot resume {run_dir}: a line of {METRICS} has no round")
    kept = [line for line in lines if line["round"] <= state["round"]]
    if len(kept) != len(lines):
        rewrite_metrics(run_dir, kept)
    return state, arrays


# clients/ and server/
def client_state_root(run_dir: Path, state_root: str = "") -> Path:
    """Where the clients' state folders are: `state-root` when set, else <run>/clients."""
    return Path(state_root).expanduser().resolve() if state_root else Path(run_dir) / CLIENTS


def ledger_path(state_dir: Path) -> Path:
    return Path(state_dir) / LEDGER_FILE


def client_ledgers(run_dir: Path, state_root: str = "") -> list[Path]:
    return sorted(client_state_root(run_dir, state_root).glob(f"*/{LEDGER_FILE}"))


def server_ledger(run_dir: Path) -> Path:
    return Path(run_dir).joinpath(*SERVER_LEDGER)


def write_progress(state_dir: Path, progress: dict[str, Any]) -> None:
    """A client's progress (run-id, round, client, step, planned, elapsed): local to the
    device; in a simulation the engine reads it to show the round's progress."""
    path = private_dir(Path(state_dir)) / PROGRESS_FILE
    tmp = path.with_name(f".{PROGRESS_FILE}.tmp")
    tmp.write_text(json.dumps(finite(progress)))  # no fsync: it is rewritten every few seconds
    os.replace(tmp, path)


def read_progress(state_root: Path) -> list[dict[str, Any]]:
    """The progress files of the clients under `state_root` (unreadable ones skipped:
    a file being replaced, a client that never trained)."""
    found = []
    for path in sorted(Path(state_root).glob(f"*/{PROGRESS_FILE}")):
        try:
            found.append(json.loads(path.read_text()))
        except (OSError, ValueError):
            continue
    return found
