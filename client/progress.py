"""A client's progress inside a round: steps done of those planned, and time spent.

Written to the client's state folder (progress.json) every few seconds and at the last
step, and logged every `progress-seconds` (and at the last step), so that a person
watching a device, or a simulation, sees the round move. Steps and elapsed time stay on
the device: on a real device nothing of this is sent (the elapsed time depends on the
Poisson batch sizes, which DP does not cover). A progress file that cannot be written
(a full disk) is logged, not fatal: the round is already charged."""

from __future__ import annotations

import logging
import time
from pathlib import Path

from contracts.rundir import write_progress
from contracts.wire import RUN_ID

log = logging.getLogger("fedslm.progress")
WRITE_EVERY = 2.0  # seconds between progress files at most (fast steps, slow SD cards)


class RoundProgress:
    def __init__(self, *, state_dir: Path, run_id: str, client: str, round: int,
                 planned: int, every: float) -> None:
        self.state_dir, self.every = state_dir, every
        self.record = {RUN_ID: run_id, "client": client, "round": round, "step": 0,
                       "planned": planned, "elapsed": 0.0}
        self.started = time.monotonic()
        self.logged = self.written = self.started
        self._write()

    def step(self, step: int) -> None:
        now = time.monotonic()
        last = step == self.record["planned"]
        self.record.update(step=step, elapsed=round(now - self.started, 3))
        if last or now - self.written >= min(WRITE_EVERY, self.every):
            self.written = now
            self._write()
        if last or now - self.logged >= self.every:
            self.logged = now
            log.info("client %s round %d: step %d/%d, %.0fs", self.record["client"],
                     self.record["round"], step, self.record["planned"], now - self.started)

    def _write(self) -> None:
        try:
            write_progress(self.state_dir, self.record)
        except OSError as exc:
            log.warning("cannot write the progress file in %s: %s", self.state_dir, exc)
