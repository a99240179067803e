"""The round's progress while clients train: every `progress-seconds`, one line with each
client's steps done of those planned and an estimate of the time left.

It reads the progress files the clients write into their state folders
(contracts.rundir.read_progress): in a simulation those are on this machine; on a
deployment they stay on the devices (each logs its own) and the line only says how long
the round has waited."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from contracts.rundir import read_progress
from contracts.wire import RUN_ID


def estimate_left(running: list[dict[str, Any]], waiting: int) -> float | None:
    """Seconds until the round's last client is done: the slowest running client's
    remaining steps at its own pace (a client that has started but not finished a step
    yet: all its steps at the others' mean pace, less its time so far), plus the clients
    not started yet, run as many at a time as are running now, each taking a running
    client's average whole time."""
    paced = [r for r in running if r["step"] > 0]
    if not paced:
        return None
    per_step = [r["elapsed"] / r["step"] for r in paced]
    mean_step = sum(per_step) / len(per_step)
    left = max([(r["planned"] - r["step"]) * p for r, p in zip(paced, per_step, strict=True)]
               + [max(0.0, r["planned"] * mean_step - r["elapsed"])
                  for r in running if r["step"] == 0])
    whole = sum(r["planned"] * p for r, p in zip(paced, per_step, strict=True)) / len(paced)
    batches = -(-waiting // max(1, len([r for r in running if r["step"] < r["planned"]])))
    return left + batches * whole


def progress_line(rnd: int, seconds: float, records: list[dict[str, Any]], sent: int) -> str:
    head = f"  round {rnd} training, {seconds:.0f}s: "
    if not records:  # a deployment: the devices log their own progress
        return head + f"waiting for {sent} clients (none has reported progress here; a " \
            "device logs its own)"
    parts = [f"{r['client']} {r['step']}/{r['planned']}" for r in records]
    waiting = max(0, sent - len(records))
    if waiting:
        parts.append(f"{waiting} waiting")
    left = estimate_left(records, waiting)
    eta = f"; about {left:.0f}s left" if left is not None else ""
    return head + ", ".join(parts) + eta


class ProgressMonitor:
    """A background thread that echoes `progress_line` every `every` seconds."""

    def __init__(self, *, state_root: Path, run_id: str, rnd: int, sent: int, every: float,
                 echo: Callable[[str], None]) -> None:
        self.state_root, self.run_id, self.rnd, self.sent = state_root, run_id, rnd, sent
        self.every, self.echo = every, echo
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True, name="fedslm-progress")
        self.started = time.monotonic()

    def records(self) -> list[dict[str, Any]]:
        return [r for r in read_progress(self.state_root)
                if r.get(RUN_ID) == self.run_id and r.get("round") == self.rnd]

    def _loop(self) -> None:
        while not self.stopped.wait(self.every):
            self.echo(progress_line(self.rnd, time.monotonic() - self.started,
                                    self.records(), self.sent))

    def __enter__(self) -> ProgressMonitor:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopped.set()
        self.thread.join()
