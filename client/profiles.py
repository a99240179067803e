"""Device profiles: what a kind of edge device draws, and defaults that suit it.

A SuperNode names its profile in its node config (`device-profile`); a simulation
takes it from the run config. The power figures feed the *estimated* energy only
(a device with RAPL or NVML is measured instead). They are nominal figures for a
busy core, assumptions rather than readings: adjust them for your hardware.
"""

from __future__ import annotations

from dataclasses import dataclass

from contracts.errors import FedslmError


@dataclass(frozen=True)
class DeviceProfile:
    name: str
    watts_per_core: float  # a busy core, for the CPU-time estimate
    threads: int  # torch threads when the config says 0
    lora_rank: int  # the LoRA rank it trains under strategy=hetlora (capped by lora-r)
    description: str


PROFILES = {p.name: p for p in (
    DeviceProfile("generic-cpu", 7.5, 0, 8, "unknown x86/ARM machine: a middle-of-the-road guess"),
    DeviceProfile("server-cpu", 10.0, 0, 16, "server core (e.g. ~250 W TDP over 24-32 cores)"),
    DeviceProfile("laptop", 5.0, 4, 8, "laptop core (e.g. ~28 W package over 4-8 cores)"),
    DeviceProfile("raspberry-pi-5", 2.0, 4, 2, "Raspberry Pi 5, 4 Cortex-A76 (~8 W under load)"),
    DeviceProfile("jetson-orin-nano", 2.5, 6, 4, "Jetson Orin Nano, 6 A78AE cores (7-15 W module)"),
)}
DEFAULT_PROFILE = "generic-cpu"


class ProfileError(FedslmError):
    """An unknown device profile."""


def profile(name: str) -> DeviceProfile:
    try:
        return PROFILES[name]
    except KeyError:
        raise ProfileError(f"unknown device profile {name!r} "
                           f"(known: {', '.join(sorted(PROFILES))})") from None
