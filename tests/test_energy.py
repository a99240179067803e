"""The energy meter: RAPL counters (wrap-around included), the labelled estimate, profiles."""

from __future__ import annotations

from pathlib import Path

import pytest

from client.energy import EnergyMeter
from client.profiles import PROFILES, ProfileError, profile
from fedslm.cli import main


def _zone(root: Path, name: str, energy: int, limit: int) -> Path:
    zone = root / name
    zone.mkdir(parents=True)
    (zone / "energy_uj").write_text(f"{energy}\n")
    (zone / "max_energy_range_uj").write_text(f"{limit}\n")
    return zone


def test_rapl_packages_are_read_and_wrap_around(tmp_path):
    package0 = _zone(tmp_path, "intel-rapl:0", 999_000_000, 1_000_000_000)
    package1 = _zone(tmp_path, "intel-rapl:1", 5_000_000, 1_000_000_000)
    _zone(tmp_path, "intel-rapl:0:0", 1, 1_000_000_000)  # a core sub-zone: not added again
    with EnergyMeter(7.5, powercap=tmp_path, hwmon=tmp_path) as meter:
        (package0 / "energy_uj").write_text("2000000\n")  # wrapped: +1 J +2 J
        (package1 / "energy_uj").write_text("9000000\n")  # +4 J
    assert meter.reading.method == "measured:rapl"
    assert meter.reading.joules == pytest.approx(7.0)


def test_board_power_sensors_are_sampled_and_integrated(tmp_path):
    import time

    for name, microwatts in (("hwmon0", 3_000_000), ("hwmon1", 1_500_000)):
        (tmp_path / "hwmon" / name).mkdir(parents=True)
        (tmp_path / "hwmon" / name / "power1_input").write_text(f"{microwatts}\n")
    with EnergyMeter(7.5, powercap=tmp_path / "none", hwmon=tmp_path / "hwmon") as meter:
        time.sleep(0.5)
    assert meter.reading.method == "measured:hwmon"
    assert meter.reading.joules == pytest.approx(4.5 * meter.reading.wall_seconds, rel=0.05)


def test_unreadable_rapl_falls_back_to_a_labelled_estimate(tmp_path):
    (tmp_path / "intel-rapl:0").mkdir()  # no readable counter, as without permissions
    with EnergyMeter(4.0, powercap=tmp_path, hwmon=tmp_path) as idle:
        pass
    with EnergyMeter(4.0, powercap=tmp_path, hwmon=tmp_path) as busy:
        sum(i * i for i in range(3_000_000))
    assert busy.reading.method == idle.reading.method == "estimated:cpu-time@4W/core"
    assert busy.reading.joules > idle.reading.joules
    assert busy.reading.joules == pytest.approx(4.0 * busy.reading.cpu_seconds)


def test_profiles_and_unknown_names(capsys):
    assert profile("raspberry-pi-5").threads == 4
    assert {"generic-cpu", "server-cpu", "laptop", "raspberry-pi-5",
            "jetson-orin-nano"} <= set(PROFILES)
    with pytest.raises(ProfileError, match="unknown device profile 'pi4'"):
        profile("pi4")
    assert main(["simulate", "--set", "device-profile=pi4"]) == 2
    assert "unknown device profile 'pi4'" in capsys.readouterr().err
