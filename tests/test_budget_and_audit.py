"""Budgets refuse rounds that would overspend; `fedslm audit` finds tampering."""

from __future__ import annotations

import json
import math
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from fedslm.cli import main
from privacy.accountant import ADD_REMOVE, REPLACE_ONE, epsilon
from privacy.budget import Budget, plan_round
from privacy.ledger import Entry, Ledger

MECH = (1.0, 0.05, 20)


def _plan(earlier, this_run, q, steps, planned, delta, target, budget, **kw):
    return plan_round(earlier_runs=earlier, this_run=this_run, sample_rate=q, steps=steps,
                      planned_steps=planned, delta=delta, target_epsilon=target, budget=budget,
                      **kw)


def test_plan_takes_keyword_arguments_only():
    with pytest.raises(TypeError):
        plan_round([], [], 0.05, 10, 30, 1e-5, 6.0, Budget())  # type: ignore[misc]


def test_plan_derives_noise_so_the_planned_rounds_land_on_the_target():
    earlier = [(0.8, 0.05, 30)]
    plan = _plan(earlier, [], 0.05, 10, 30, 1e-5, target=6.0, budget=Budget())
    assert plan.refused == ""
    final = epsilon(earlier + [(plan.noise_multiplier, 0.05, 30)], 1e-5)
    assert 5.9 < final <= 6.0  # the whole planned run, earlier spend included


def test_plan_refuses_what_the_budget_does_not_allow():
    spent = [MECH]
    before = epsilon(spent, 1e-5)
    over = _plan(spent, [], 0.05, 20, 20, 1e-5, 100.0, Budget(epsilon=before * 1.1),
                      noise_multiplier=1.0)
    assert over.refused.startswith("this round would bring ε to")
    assert over.epsilon_after > before * 1.1
    exhausted = _plan(spent, [], 0.05, 20, 20, 1e-5, 100.0, Budget(epsilon=before * 0.99))
    assert exhausted.refused.startswith("budget exhausted")
    assert _plan([], [], 0.05, 20, 20, 1e-4, 8.0, Budget(delta=1e-5)).refused == \
        "δ=0.0001 exceeds the budget δ=1e-05"
    no_dp = _plan([], [], 0.05, 20, 20, 1e-5, 8.0, Budget(epsilon=50), private=False)
    assert no_dp.refused and math.isinf(no_dp.epsilon_after)
    fits = _plan(spent, [], 0.05, 20, 20, 1e-5, 100.0, Budget(epsilon=before * 3),
                      noise_multiplier=1.0)
    assert fits.refused == "" and fits.epsilon_after <= before * 3


def _gaussian_delta(eps: float, mu: float) -> float:
    """Exact δ(ε) of a Gaussian mechanism with μ = sensitivity/σ (Balle & Wang, 2018)."""
    phi = lambda x: 0.5 * (1 + math.erf(x / math.sqrt(2)))  # noqa: E731
    return phi(-eps / mu + mu / 2) - math.exp(eps) * phi(-eps / mu - mu / 2)


def test_accountants_against_the_exact_gaussian_mechanism():
    """Full batch (q=1), T steps of σ = one Gaussian with μ = √T/σ: exact ε by bisection."""
    sigma, steps, delta = 4.0, 16, 1e-5
    mu = math.sqrt(steps) / sigma
    lo, hi = 0.0, 50.0
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if _gaussian_delta(mid, mu) > delta else (lo, mid)
    exact = hi
    history = [(sigma, 1.0, steps)]
    for name in ("prv", "pld"):
        assert epsilon(history, delta, name, ADD_REMOVE) == pytest.approx(exact, rel=0.02)
    for name in ("rdp", "dp-accounting-rdp"):  # RDP: an upper bound, not far above
        assert exact <= epsilon(history, delta, name, ADD_REMOVE) <= exact * 1.3
    # replace-one, no sampling: the same Gaussian at twice the sensitivity (2σ here)
    for name in ("pld", "fft"):
        assert epsilon([(2 * sigma, 1.0, steps)], delta, name, REPLACE_ONE) == \
            pytest.approx(exact, rel=0.02)


def _ledger(path: Path, entries: int = 3, budget: float | None = None) -> list[float]:
    eps = []
    with Ledger(path) as ledger:
        for i in range(1, entries + 1):
            eps.append(epsilon([MECH] * i, 1e-5))
            ledger.append(Entry("run-a", i, path.parent.name, "fp", *MECH, 1e-5, "pld",
                                eps[-1], "t", budget_epsilon=budget, relation=REPLACE_ONE))
    return eps


def _audit(path: Path, capsys) -> tuple[int, str]:
    code = main(["audit", str(path)])
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def _sql(path: Path, *statements: str) -> None:
    db = sqlite3.connect(path)
    db.executescript("DROP TRIGGER entries_no_update; DROP TRIGGER entries_no_delete;")
    for statement in statements:
        db.execute(statement)
    db.commit()
    db.close()


def test_an_intact_ledger_passes_and_json_has_the_contract(tmp_path, capsys):
    path = tmp_path / "alice" / "ledger.sqlite"
    eps = _ledger(path, budget=5.0)
    assert main(["audit", str(path), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    (client,) = result["clients"]
    assert result["ok"] is True
    assert client["epsilon"] == pytest.approx(eps[-1]) == client["epsilon_reported"]
    assert client["relation"] == REPLACE_ONE and len(client["ledger_id"]) == 16
    assert client["accountants"]["fft"] == pytest.approx(eps[-1], rel=0.01)
    assert (client["budget_epsilon"], client["within_budget"], client["chain_intact"]) == \
        (5.0, True, True)
    expected = {"noise_multiplier": 1.0, "sample_rate": 0.05, "steps": 20}
    assert {k: client["history"][0][k] for k in expected} == expected


@pytest.mark.parametrize("tamper, expected", [
    ("UPDATE entries SET body = replace(body, '\"noise_multiplier\": 1.0', "
     "'\"noise_multiplier\": 3.0') WHERE seq = 2", "entry 2: contents do not match its hash"),
    ("DELETE FROM entries WHERE seq = 2", "entry 2: missing"),
    ("UPDATE entries SET seq = seq + 10", "entry 1: missing"),
])
def test_tampering_is_found_and_named(tmp_path, capsys, tamper, expected):
    path = tmp_path / "alice" / "ledger.sqlite"
    _ledger(path)
    _sql(path, tamper)
    code, out = _audit(path, capsys)
    assert code == 1
    assert f"alice ({path}): {expected}" in out
    assert "BROKEN" in out


def test_reordered_entries_are_found(tmp_path, capsys):
    path = tmp_path / "alice" / "ledger.sqlite"
    _ledger(path)
    _sql(path, "UPDATE entries SET seq = 100 WHERE seq = 1",
         "UPDATE entries SET seq = 1 WHERE seq = 2", "UPDATE entries SET seq = 2 WHERE seq = 100")
    code, out = _audit(path, capsys)
    assert code == 1 and "entry 1: does not follow the previous entry's hash" in out


def test_a_truncated_file_and_a_non_ledger(tmp_path, capsys):
    path = tmp_path / "alice" / "ledger.sqlite"
    with Ledger(path) as ledger:  # enough entries for several database pages
        for i in range(1, 60):
            ledger.append(Entry("run-a", i, "alice", "fp", *MECH, 1e-5, "rdp", 1.0, "t" * 50))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    code, out = _audit(path, capsys)
    assert code == 1 and "ledger unreadable (truncated or corrupted)" in out
    other = tmp_path / "notes.txt"
    other.write_text("hello")
    assert _audit(other, capsys) == (2, f"fedslm: error: {other} is not a fedslm privacy "
                                        "ledger\n")


def test_over_budget_and_a_wrong_reported_epsilon(tmp_path, capsys):
    path = tmp_path / "alice" / "ledger.sqlite"
    eps = _ledger(path, budget=1.0)
    code, out = _audit(path, capsys)
    assert code == 1 and f"ε={eps[-1]:.4f} is over the budget ε=1" in out
    liar = tmp_path / "bob" / "ledger.sqlite"
    with Ledger(liar) as ledger:
        ledger.append(Entry("run-a", 1, "bob", "fp", *MECH, 1e-5, "pld", 0.01, "t",
                            relation=REPLACE_ONE))
    code, out = _audit(liar, capsys)
    assert code == 1 and "reported ε=0.0100 but the recorded mechanisms give" in out


def test_a_truncated_tail_is_found_against_the_runs_metrics(tmp_path, capsys):
    run = tmp_path / "run"
    eps = _ledger(run / "clients" / "alice" / "ledger.sqlite")
    (run / "config.json").write_text(json.dumps({"run-id": "run-a"}))
    lines = [{"round": r, "clients": [{"client": "alice", "status": "trained",
                                       "epsilon": eps[r - 1]}]} for r in (1, 2, 3)]
    (run / "metrics.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    assert _audit(run, capsys)[0] == 0
    _sql(run / "clients" / "alice" / "ledger.sqlite", "DELETE FROM entries WHERE seq = 3")
    code, out = _audit(run, capsys)
    assert code == 1
    assert "round 3: the server saw a spend that is missing from the ledger" in out


def test_the_spend_survives_a_crash_between_training_and_reply(tiny_model, text_clients,
                                                               tmp_path):
    """The process dies after training, before the reply: the ledger has the spend."""
    script = textwrap.dedent(f"""
        import os, sys
        sys.path.insert(0, {str(Path(__file__).resolve().parents[1])!r})
        from client import rounds
        from tests.helpers import client_settings
        def crash(model):
            os._exit(3)  # killed after training, before the update is packed
        rounds.adapter_mod.get_adapter = crash
        s = client_settings({str(tiny_model)!r}, {str(text_clients)!r}, {str(tmp_path)!r})
        rounds.train_round(s, {{}})
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 3, out.stderr[-2000:]
    with Ledger(tmp_path / "client-0" / "ledger.sqlite", create=False) as ledger:
        (entry,) = ledger.entries()
        assert entry.round == 1 and entry.epsilon > 0 and ledger.verify() == []


def _local_run(tmp_path: Path, clients: tuple[str, ...] = ("alice", "bob")) -> Path:
    """A simulation's run directory: its clients' ledgers under <run>/clients."""
    run = tmp_path / "run"
    eps = {name: _ledger(run / "clients" / name / "ledger.sqlite") for name in clients}
    (run / "config.json").write_text(json.dumps({"run-id": "run-a", "ledgers": "local"}))
    lines = [{"round": r, "clients": [{"client": name, "status": "trained",
                                       "epsilon": eps[name][r - 1]} for name in clients],
              "privacy_flags": []} for r in (1, 2, 3)]
    (run / "metrics.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    return run


def test_a_deleted_ledger_is_named_against_the_runs_metrics(tmp_path, capsys):
    run = _local_run(tmp_path)
    assert _audit(run, capsys)[0] == 0
    (run / "clients" / "bob" / "ledger.sqlite").unlink()
    code, out = _audit(run, capsys)
    assert code == 1
    assert "the server saw this client spend privacy, but its ledger is missing" in out
    # a new, shorter ledger in its place lacks the rounds the server saw
    with Ledger(run / "clients" / "bob" / "ledger.sqlite") as ledger:
        ledger.append(Entry("run-a", 3, "bob", "fp", *MECH, 1e-5, "pld",
                            epsilon([MECH], 1e-5), "t", relation=REPLACE_ONE))
    code, out = _audit(run, capsys)
    assert code == 1 and "round 1: the server saw a spend that is missing from the ledger" in out


def test_the_servers_flags_and_unseen_charges_are_reported(tmp_path, capsys):
    run = _local_run(tmp_path, ("alice",))
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    lines[2]["privacy_flags"] = [{"client": "alice", "problem": "cumulative ε went down"}]
    lines[1]["clients"][0]["status"] = "rejected: update norm too large"
    (run / "metrics.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    code, out = _audit(run, capsys)
    assert code == 1
    assert "round 3: the server flagged alice: cumulative ε went down" in out
    assert "alice: note: rounds [2]: charged in the ledger, no update used by the server" in out


def test_a_deployments_run_directory_points_to_the_devices(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"run-id": "run-a", "ledgers": "on-devices"}))
    (run / "metrics.jsonl").write_text(json.dumps(
        {"round": 1, "clients": [], "privacy_flags": []}) + "\n")
    code, out = _audit(run, capsys)
    assert code == 0 and "the clients' ledgers are on their devices" in out


def test_the_central_dp_ledger_is_checked_by_flowers_accountant(tmp_path, capsys):
    from contracts.rundir import SERVER_CLIENT

    run = tmp_path / "run"
    history = [(1.2, 0.5, 1)] * 3
    with Ledger(run / "server" / "ledger.sqlite") as ledger:
        for i in range(1, 4):
            ledger.append(Entry("run-a", i, SERVER_CLIENT, "federation", *history[0], 1e-5,
                                "rdp", epsilon(history[:i], 1e-5, "rdp", ADD_REMOVE), "t",
                                relation=ADD_REMOVE))
    (run / "config.json").write_text(json.dumps({"run-id": "run-a", "num-clients": 4}))
    (run / "metrics.jsonl").write_text("")
    assert main(["audit", str(run), "--json"]) == 0
    (server,) = json.loads(capsys.readouterr().out)["clients"]
    assert server["relation"] == ADD_REMOVE
    assert set(server["accountants"]) == {"rdp", "dp-accounting-rdp", "flower-rdp"}
    assert server["accountants"]["flower-rdp"] == pytest.approx(server["epsilon"], rel=0.01)
