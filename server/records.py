"""The run directory: config.json, metrics.jsonl, adapter/, clients/."""

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

from privacy.jsonsafe import finite

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"


def new_run_dir(out: str | Path) -> Path:
    run_id = time.strftime("%Y%m%d-%H%M%S") + "-" + secrets.token_hex(2)
    path = Path(out).expanduser().resolve() / run_id
    (path / "clients").mkdir(parents=True)
    return path


def write_json(path: Path, data: Any) -> None:
    _atomic_write(path, (json.dumps(finite(data), indent=2) + "\n").encode())


def append_metrics(run_dir: Path, line: dict[str, Any]) -> None:
    with open(run_dir / "metrics.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps(finite(line), allow_nan=False) + "\n")
        f.flush()
        os.fsync(f.fileno())


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def save_adapter(folder: Path, arrays: dict[str, np.ndarray], config_json: str) -> None:
    """The adapter in PEFT's format, loadable with PeftModel.from_pretrained."""
    from safetensors.numpy import save

    folder.mkdir(parents=True, exist_ok=True)
    tensors = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in arrays.items()}
    _atomic_write(folder / ADAPTER_WEIGHTS, save(tensors, metadata={"format": "pt"}))
    _atomic_write(folder / ADAPTER_CONFIG, config_json.encode())


def _atomic_write(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def summary_line(line: dict[str, Any], num_rounds: int) -> str:
    eps = line.get("epsilon")
    if eps is None or math.isinf(eps):
        eps_text = "no DP (ε = ∞)"
    else:
        eps_text = f"ε {eps:.2f} (δ={line['delta']:g})"
    if line.get("central_epsilon"):
        eps_text += f"  user-level ε {line['central_epsilon']:.2f}"
    extra = "".join(f"  {key}: {len(line[key])}" for key in ("dropouts", "failures")
                    if line.get(key))
    if line.get("skipped"):
        extra += "  (training skipped: too few updates)"
    return (
        f"round {line['round']}/{num_rounds}  loss {line['eval_loss']:.3f}  "
        f"ppl {line['perplexity']:.1f}  acc {line['token_accuracy']:.3f}  {eps_text}  "
        f"{line['round_seconds']:.1f}s  up {line['bytes_up'] / 1e6:.2f} MB  "
        f"down {line['bytes_down'] / 1e6:.2f} MB{extra}"
    )


CHECKPOINT = "checkpoint"


class CheckpointError(ValueError):
    """A run directory that cannot be resumed."""


def save_checkpoint(run_dir: Path, state: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
    """The server's state after a completed round: adapter first, then the state that
    names it, each written atomically, so that a crash leaves the previous checkpoint."""
    from safetensors.numpy import save

    folder = run_dir / CHECKPOINT
    folder.mkdir(exist_ok=True)
    name = f"round-{state['round']}.safetensors"
    tensors = {k: np.ascontiguousarray(v) for k, v in arrays.items()}
    _atomic_write(folder / name, save(tensors))
    write_json(folder / "state.json", {**state, "adapter": name})
    for old in folder.glob("round-*.safetensors"):
        if old.name != name:
            old.unlink()


def checkpoint_round(run_dir: Path) -> int:
    """The last completed round of a run directory (CheckpointError if none)."""
    try:
        return int(json.loads((Path(run_dir) / CHECKPOINT / "state.json").read_text())["round"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"cannot resume {run_dir}: no readable checkpoint ({exc})") from None


def load_checkpoint(run_dir: Path) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """(state, global adapter) of the last completed round; metrics.jsonl is cut back to
    that round (a line written after the checkpoint belongs to a round being redone)."""
    from safetensors.numpy import load

    run_dir = Path(run_dir)
    try:
        state = json.loads((run_dir / CHECKPOINT / "state.json").read_text())
        arrays = load((run_dir / CHECKPOINT / state["adapter"]).read_bytes())
        lines = read_metrics(run_dir)
    except (OSError, ValueError, KeyError) as exc:
        raise CheckpointError(f"cannot resume {run_dir}: no readable checkpoint ({exc})") from None
    kept = [line for line in lines if line["round"] <= state["round"]]
    if len(kept) != len(lines):
        _atomic_write(run_dir / "metrics.jsonl",
                      "".join(json.dumps(line) + "\n" for line in kept).encode())
    return state, arrays
