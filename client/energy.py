"""Energy of local work. Here: an estimate from CPU time, labelled as such.

No hardware counter is read yet (RAPL, NVML and board sensors are issue #4);
every figure carries `method` so an estimate is never shown as a measurement.
"""

from __future__ import annotations

import resource
import time
from dataclasses import dataclass

DEFAULT_WATTS_PER_CORE = 7.5  # a busy server/laptop core; an assumption, not a reading


@dataclass
class EnergyReading:
    joules: float
    method: str
    cpu_seconds: float
    wall_seconds: float


class CpuTimeEnergy:
    """Joules ≈ process CPU seconds × watts per busy core (estimate)."""

    def __init__(self, watts_per_core: float = DEFAULT_WATTS_PER_CORE) -> None:
        self.watts_per_core = watts_per_core
        self._cpu = self._wall = 0.0

    def __enter__(self) -> CpuTimeEnergy:
        self._cpu, self._wall = time.process_time(), time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        cpu = time.process_time() - self._cpu
        wall = time.perf_counter() - self._wall
        method = f"estimated:cpu-time@{self.watts_per_core:g}W/core"
        self.reading = EnergyReading(cpu * self.watts_per_core, method, cpu, wall)


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
