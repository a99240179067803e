"""Energy of a client's local work, measured where the device has a counter.

Sources, in order of preference:
- `measured:rapl`: Linux powercap (Intel/AMD RAPL) package counters. They count the
  whole CPU package, so other load on the machine is included.
- `measured:nvml`: the NVIDIA driver's energy counter of the GPU in use.
- `estimated:cpu-time@<W>W/core`: the process's CPU seconds × the device profile's
  watts per busy core. An estimate, and labelled as one.

Zeus and CodeCarbon were considered: on this kind of machine Zeus reports time only
and CodeCarbon's offline tracker is itself a CPU-time × TDP estimate, so a few lines
that read the counters directly, and say which, serve better and add no dependency.
"""

from __future__ import annotations

import resource
import time
from dataclasses import dataclass
from pathlib import Path

POWERCAP = Path("/sys/class/powercap")


@dataclass
class EnergyReading:
    joules: float
    method: str
    cpu_seconds: float
    wall_seconds: float


class _Rapl:
    """Package-level RAPL domains (intel-rapl:N, not their sub-zones)."""

    def __init__(self, root: Path) -> None:
        self.zones = []
        for zone in sorted(root.glob("intel-rapl:*")):
            if zone.name.count(":") != 1:
                continue  # a sub-zone (core, uncore, dram) is already in its package
            try:
                int((zone / "energy_uj").read_text())
                limit = int((zone / "max_energy_range_uj").read_text())
            except (OSError, ValueError):
                continue  # unreadable (permissions): not a usable counter
            self.zones.append((zone / "energy_uj", limit))

    def read(self) -> list[int]:
        return [int(path.read_text()) for path, _ in self.zones]

    def joules(self, start: list[int], end: list[int]) -> float:
        total = 0
        for (_, limit), a, b in zip(self.zones, start, end, strict=True):
            total += b - a if b >= a else b + limit - a  # the counter wrapped around
        return total / 1e6


class _Nvml:
    def __init__(self) -> None:
        import pynvml  # nvidia-ml-py, present on GPU installs only

        pynvml.nvmlInit()
        self._nvml = pynvml
        self._handle = pynvml.nvmlDeviceGetHandleByIndex(0)
        self.read()

    def read(self) -> list[int]:
        return [self._nvml.nvmlDeviceGetTotalEnergyConsumption(self._handle)]  # mJ

    def joules(self, start: list[int], end: list[int]) -> float:
        return (end[0] - start[0]) / 1e3


class EnergyMeter:
    """Context manager: `with meter: work()`, then `meter.reading`."""

    def __init__(self, watts_per_core: float, powercap: Path = POWERCAP,
                 gpu: bool = False) -> None:
        self.watts_per_core = watts_per_core
        self.counter, self.method = None, f"estimated:cpu-time@{watts_per_core:g}W/core"
        rapl = _Rapl(powercap)
        if rapl.zones:
            self.counter, self.method = rapl, "measured:rapl"
        elif gpu:
            try:
                self.counter, self.method = _Nvml(), "measured:nvml"
            except Exception:  # no pynvml, no driver, no energy counter: fall back
                pass
        self._start: list[int] = []

    def __enter__(self) -> EnergyMeter:
        self._cpu, self._wall = time.process_time(), time.perf_counter()
        self._start = self.counter.read() if self.counter else []
        return self

    def __exit__(self, *exc: object) -> None:
        cpu = time.process_time() - self._cpu
        wall = time.perf_counter() - self._wall
        if self.counter:
            joules = self.counter.joules(self._start, self.counter.read())
        else:
            joules = cpu * self.watts_per_core
        self.reading = EnergyReading(joules, self.method, cpu, wall)


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
