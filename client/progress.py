"""A client's progress inside a round: steps done of those planned, and time spent.

Written to the client's state folder (progress.json) after every step and logged at most
every `progress-seconds` (and at the last step), so that a person watching a device, or
a simulation, sees the round move. Steps and elapsed time stay on the device: on a real
device nothing of this is sent (the elapsed time depends on the Poisson batch sizes,
which DP does not cover)."""

from __future__ import annotations

import logging
import time
from pathlib import Path

from contracts.rundir import write_progress

log = logging.getLogger("fedslm.progress")


class RoundProgress:
    def __init__(self, *, state_dir: Path, run_id: str, client: str, round: int,
                 planned: int, every: float) -> None:
        self.state_dir, self.every = state_dir, every
        self.record = {"run-id": run_id, "client": client, "round": round, "step": 0,
                       "planned": planned, "elapsed": 0.0}
        self.started = time.monotonic()
        self.logged = self.started
        write_progress(state_dir, self.record)

    def step(self, step: int) -> None:
        now = time.monotonic()
        self.record.update(step=step, elapsed=round(now - self.started, 3))
        write_progress(self.state_dir, self.record)
        if now - self.logged >= self.every or step == self.record["planned"]:
            self.logged = now
            log.info("client %s round %d: step %d/%d, %.0fs", self.record["client"],
                     self.record["round"], step, self.record["planned"], now - self.started)
