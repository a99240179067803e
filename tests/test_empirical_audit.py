"""The empirical audit mode: canaries planted in a real simulation, then scored.
Without DP the tiny model memorises them (clear lower bound); with DP it may not,
and the lower bound stays under the accountant's ε."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from privacy.attacks import auc, ceiling, exposure, one_run_lower_bound, p_value, tpr_at_fpr
from tests.test_simulation import _fedslm

ALL_LINEAR = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"


def test_statistics_on_known_scores():
    members = [True, False] * 50
    perfect = [1.0 if m else 0.0 for m in members]
    assert auc(perfect, members) == 1.0 and tpr_at_fpr(perfect, members) == 1.0
    assert auc([0.5] * 100, members) == 0.5
    bound, guesses, correct = one_run_lower_bound(perfect, members)
    assert (guesses, correct) == (50, 50) and 2.5 < bound < 3.5
    assert one_run_lower_bound([0.0] * 100, members)[0] == 0.0
    assert exposure(1, 32) == 5.0 and exposure(32, 32) == 0.0


def test_the_audit_ceiling_and_the_delta_term():
    """200 canaries at 95%: even 100 right guesses out of 100 certify only ε ≈ 3.49
    (0.95^(1/100) = e^ε / (1 + e^ε)); δ > 0 lowers what a count certifies."""
    p = 0.05 ** (1 / 100)
    assert ceiling(200) == pytest.approx(math.log(p / (1 - p)), abs=1e-6)
    assert ceiling(200, delta=1e-5) < ceiling(200) < ceiling(1000)
    members = [True, False] * 100
    perfect = [1.0 if m else 0.0 for m in members]
    assert one_run_lower_bound(perfect, members)[0] == pytest.approx(ceiling(200))
    assert one_run_lower_bound(perfect, members, delta=1e-3)[0] < ceiling(200) - 0.05
    assert p_value(200, 100, 60, 0.0) == pytest.approx(0.0284, abs=1e-3)  # P[Bin(100,½) ≥ 60]


def _audit_run(tiny_model, text_clients, tmp_path, dp: bool) -> dict:
    out = _fedslm(["simulate", "--clients", "1", "--rounds", "1", "--local-steps", "200",
                   "--out", str(tmp_path / "runs"), "--set", f"model={tiny_model}",
                   "--set", f"data={text_clients}", "--set", "seq-len=32",
                   "--set", "batch-size=16", "--set", f"dp={str(dp).lower()}",
                   "--set", "audit-canaries=100", "--set", f"lora-targets={ALL_LINEAR}",
                   "--set", "lora-r=16"], tmp_path / "cache")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "empirical audit: AUC" in out.stdout
    run_dir = out.stdout.strip().splitlines()[-1]
    audit = subprocess.run([sys.executable, "-m", "fedslm.cli", "audit", run_dir, "--json"],
                           capture_output=True, text=True, timeout=120)
    result = json.loads(audit.stdout)
    assert audit.returncode == (0 if result["ok"] else 1)
    return result


@pytest.mark.slow
def test_without_dp_the_canaries_are_found(tiny_model, text_clients, tmp_path):
    empirical = _audit_run(tiny_model, text_clients, tmp_path, dp=False)["empirical"]
    assert empirical["canaries"] == 100
    assert empirical["auc"] > 0.8
    assert empirical["epsilon_lower_bound"] > 1.0
    assert empirical["epsilon_accountant"] is None  # ε = ∞


@pytest.mark.slow
def test_with_dp_the_lower_bound_stays_below_the_accountant(tiny_model, text_clients, tmp_path):
    result = _audit_run(tiny_model, text_clients, tmp_path, dp=True)
    empirical = result["empirical"]
    assert 0 < empirical["epsilon_accountant"] <= 8.0
    assert empirical["epsilon_lower_bound"] <= empirical["epsilon_accountant"]
    assert empirical["epsilon_ceiling"] == pytest.approx(ceiling(100, delta=1e-5))
    assert empirical["delta"] == 1e-5
    assert empirical["problems"] == [] and result["ok"]
