"""Energy of a client's local work, measured where the device has a counter.

Sources, in order of preference:
- `measured:rapl`: Linux powercap (Intel/AMD RAPL) package counters. They count the
  whole CPU package, so other load on the machine is included.
- `measured:nvml`: the NVIDIA driver's energy counter of the GPU in use.
- `measured:hwmon`: board power sensors exposed by Linux hwmon (`power*_input`, µW; e.g.
  the INA3221 rails of a Jetson), sampled every 0.1 s and integrated over time.
- `estimated:cpu-time@<W>W/core`: the process's CPU seconds × the device profile's
  watts per busy core. An estimate, and labelled as one.

Zeus and CodeCarbon were considered: on this kind of machine Zeus reports time only
and CodeCarbon's offline tracker is itself a CPU-time × TDP estimate, so a few lines
that read the counters directly, and say which, serve better and add no dependency.
"""

from __future__ import annotations

import resource
import threading
import time
from dataclasses import dataclass
from pathlib import Path

POWERCAP = Path("/sys/class/powercap")
HWMON = Path("/sys/class/hwmon")
SAMPLE_SECONDS = 0.1


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

    def _read(self) -> list[int]:
        return [int(path.read_text()) for path, _ in self.zones]

    def start(self) -> None:
        self._start = self._read()

    def stop(self) -> float:
        total = 0
        for (_, limit), a, b in zip(self.zones, self._start, self._read(), strict=True):
            total += b - a if b >= a else b + limit - a  # the counter wrapped around
        return total / 1e6


class _Nvml:
    def __init__(self) -> None:
        import pynvml  # nvidia-ml-py, present on GPU installs only

        pynvml.nvmlInit()
        self._nvml = pynvml
        self._handle = pynvml.nvmlDeviceGetHandleByIndex(0)
        self.start()  # fails here, not mid-round, on a GPU without an energy counter

    def _read(self) -> int:
        return self._nvml.nvmlDeviceGetTotalEnergyConsumption(self._handle)  # mJ

    def start(self) -> None:
        self._start = self._read()

    def stop(self) -> float:
        return (self._read() - self._start) / 1e3


class _Hwmon:
    """Power sensors (µW) sampled in a thread; energy = trapezoid integral over time."""

    def __init__(self, root: Path, interval: float = SAMPLE_SECONDS) -> None:
        self.sensors = []
        for path in sorted(root.glob("hwmon*/power*_input")):
            try:
                int(path.read_text())
                self.sensors.append(path)
            except (OSError, ValueError):
                continue
        self.interval = interval
        self._stop = threading.Event()

    def _watts(self) -> float:
        return sum(int(p.read_text()) for p in self.sensors) / 1e6

    def _sample(self) -> None:
        last_t, last_w = time.perf_counter(), self._watts()
        while not self._stop.wait(self.interval):
            t, w = time.perf_counter(), self._watts()
            self._joules += (w + last_w) / 2 * (t - last_t)
            last_t, last_w = t, w
        t, w = time.perf_counter(), self._watts()
        self._joules += (w + last_w) / 2 * (t - last_t)

    def start(self) -> None:
        self._joules = 0.0
        self._stop.clear()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        return self._joules


class EnergyMeter:
    """Context manager: `with meter: work()`, then `meter.reading`."""

    def __init__(self, watts_per_core: float, powercap: Path = POWERCAP,
                 gpu: bool = False, hwmon: Path = HWMON) -> None:
        self.watts_per_core = watts_per_core
        self.counter, self.method = None, f"estimated:cpu-time@{watts_per_core:g}W/core"
        rapl, board = _Rapl(powercap), _Hwmon(hwmon)
        if rapl.zones:
            self.counter, self.method = rapl, "measured:rapl"
        elif board.sensors:
            self.counter, self.method = board, "measured:hwmon"
        elif gpu:
            try:
                self.counter, self.method = _Nvml(), "measured:nvml"
            except Exception:  # no pynvml, no driver, no energy counter: fall back
                pass

    def __enter__(self) -> EnergyMeter:
        self._cpu, self._wall = time.process_time(), time.perf_counter()
        if self.counter:
            self.counter.start()
        return self

    def __exit__(self, *exc: object) -> None:
        cpu = time.process_time() - self._cpu
        wall = time.perf_counter() - self._wall
        joules = self.counter.stop() if self.counter else cpu * self.watts_per_core
        self.reading = EnergyReading(joules, self.method, cpu, wall)


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
