"""Accounting cross-checks, cumulative ε across recreated clients, and the ledger chain."""

from __future__ import annotations

import json
import sqlite3
import stat

import pytest

from client.cache import Session
from client.rounds import train_round
from contracts.rundir import LEDGER_FILE, new_run_dir, write_progress
from privacy.accountant import (
    ADD_REMOVE,
    CHARGED,
    REPLACE_ONE,
    epsilon,
    flower_rdp,
    noise_for_target,
)
from privacy.ledger import Entry, Ledger, LedgerError
from tests.helpers import client_settings

KNOWN = [(1.0, 0.016, 63 * 20)]  # NOTES.md: RDP 3.80, PRV 3.44, dp-accounting RDP 3.80


def test_independent_accountants_agree_on_a_known_setting():
    assert epsilon(KNOWN, 1e-5, "rdp", ADD_REMOVE) == pytest.approx(3.80, abs=0.01)
    assert epsilon(KNOWN, 1e-5, "dp-accounting-rdp", ADD_REMOVE) == pytest.approx(3.80, abs=0.01)
    assert epsilon(KNOWN, 1e-5, "prv", ADD_REMOVE) == pytest.approx(3.44, abs=0.03)
    assert epsilon(KNOWN, 1e-5, "pld", ADD_REMOVE) == pytest.approx(3.43, abs=0.01)
    assert epsilon(KNOWN, 1e-5, "fft", ADD_REMOVE) == pytest.approx(3.43, abs=0.01)
    # replace-one, the relation charged: Google's PLD and Koskela et al.'s Fourier accountant
    pld, fft = epsilon(KNOWN, 1e-5, "pld", REPLACE_ONE), epsilon(KNOWN, 1e-5, "fft", REPLACE_ONE)
    assert pld == pytest.approx(5.51, abs=0.01) and fft == pytest.approx(pld, rel=1e-3)
    assert epsilon(KNOWN, 1e-5) == pld  # the default is what ledgers are charged with
    assert CHARGED == ("pld", REPLACE_ONE)


def test_the_accountants_agree_where_epsilon_is_large():
    """A device's run at ε ≈ 20: the Fourier accountant's grid at L = 20 read 18.51 (its
    range cut the tail); it must agree with the PLD, so that an audit can check it."""
    large = [(0.322265625, 4 / 57, 4)]
    pld = epsilon(large, 1e-5, "pld", REPLACE_ONE)
    assert pld == pytest.approx(19.90, abs=0.01)
    assert epsilon(large, 1e-5, "fft", REPLACE_ONE) == pytest.approx(pld, rel=1e-3)


def test_replace_one_without_sampling_is_add_remove_at_twice_the_sensitivity():
    """q = 1: replacing a record moves the sum by up to 2C, the Gaussian mechanism of
    σ/2 under add/remove (a closed-form check on both replace-one accountants)."""
    for name in ("pld", "fft"):
        assert epsilon([(2.0, 1.0, 1)], 1e-5, name, REPLACE_ONE) == pytest.approx(
            epsilon([(1.0, 1.0, 1)], 1e-5, "pld", ADD_REMOVE), rel=1e-4)
    demo = [(0.6, 16 / 400, 18)]
    assert epsilon(demo, 1e-5, "pld", REPLACE_ONE) > epsilon(demo, 1e-5, "pld", ADD_REMOVE)


def test_edge_cases_of_epsilon():
    assert epsilon([], 1e-5) == 0.0
    assert epsilon([(0.0, 0.1, 5)], 1e-5) == float("inf")
    split = epsilon([(1.0, 0.016, 600), (1.0, 0.016, 660)], 1e-5)
    assert split == pytest.approx(epsilon(KNOWN, 1e-5), rel=1e-9)
    with pytest.raises(ValueError, match="no accountant 'magic'"):
        epsilon(KNOWN, 1e-5, "magic")
    with pytest.raises(ValueError, match="no accountant 'rdp' for relation 'replace-one'"):
        epsilon(KNOWN, 1e-5, "rdp")  # Opacus' RDP is add/remove only


def test_flowers_rdp_accountant_matches_where_its_model_does():
    history = [(1.1, 0.5, 3), (1.3, 0.5, 2)]  # 5 of 10 clients a round, Poisson
    assert flower_rdp(history, 1e-5, 10) == pytest.approx(
        epsilon(history, 1e-5, "rdp", ADD_REMOVE), rel=0.01)
    with pytest.raises(ValueError, match="not a whole number"):
        flower_rdp([(1.0, 0.25, 1)], 1e-5, 10)  # 2.5 clients: not its model


def test_noise_for_target_is_the_smallest_that_fits():
    sigma = noise_for_target(8.0, 1e-5, 0.07, 30)
    assert epsilon([(sigma, 0.07, 30)], 1e-5) <= 8.0
    assert epsilon([(sigma * 0.99, 0.07, 30)], 1e-5) > 8.0 * 0.98
    with pytest.raises(ValueError, match="out of reach"):
        noise_for_target(1.0, 1e-5, 0.5, 30, prior=[(0.0, 0.5, 1)])


def test_cumulative_epsilon_of_a_recreated_client_equals_one_accountant(
        tiny_model, text_clients, tmp_path):
    reported = []
    for rnd in (1, 2, 3):
        Session.forget()  # Flower recreates the ClientApp: nothing survives in memory
        s = client_settings(tiny_model, text_clients, tmp_path, server_round=rnd, local_steps=3)
        _, metrics, info = train_round(s, {})
        reported.append(metrics["epsilon"])
    history = [(metrics["noise-multiplier"], metrics["sample-rate"], 3 * 3)]
    assert reported[0] < reported[1] < reported[2]
    assert reported[-1] == pytest.approx(epsilon(history, 1e-5, "pld", REPLACE_ONE), rel=1e-9)
    assert reported[-1] == pytest.approx(epsilon(history, 1e-5, "fft", REPLACE_ONE), rel=1e-3)
    assert reported[-1] <= 8.0  # the planned rounds land on the target ε
    with Ledger(tmp_path / info["client"] / LEDGER_FILE) as ledger:
        entries = ledger.entries()
        assert [e.round for e in entries] == [1, 2, 3]
        assert [e.epsilon for e in entries] == pytest.approx(reported)
        assert {(e.accountant, e.relation) for e in entries} == {("pld", REPLACE_ONE)}
        assert ledger.verify() == []
        assert len(ledger.ledger_id) == 16 and info["ledger-id"] == ledger.ledger_id


def test_ledgers_and_state_folders_are_private(tmp_path):
    path = tmp_path / "state" / "alice" / "ledger.sqlite"
    with Ledger(path) as ledger:
        ledger.append(_entry(1))
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    for sidecar in path.parent.glob("ledger.sqlite-*"):  # SQLite's -wal and -shm
        assert stat.S_IMODE(sidecar.stat().st_mode) == 0o600
    run = new_run_dir(tmp_path / "runs")
    assert stat.S_IMODE((run / "clients").stat().st_mode) == 0o700
    write_progress(tmp_path / "bob", {"step": 1})
    assert stat.S_IMODE((tmp_path / "bob").stat().st_mode) == 0o700


def test_a_ledger_from_before_the_relation_was_recorded_reads_as_add_remove(tmp_path):
    path = tmp_path / "ledger.sqlite"
    with Ledger(path) as ledger:
        ledger.append(_entry(1))
        body = json.loads(ledger._db.execute("SELECT body FROM entries").fetchone()[0])
    assert body["relation"] == ADD_REMOVE  # _entry() leaves the legacy default
    del body["relation"]
    assert Entry(**body).relation == ADD_REMOVE


def _entry(i: int) -> Entry:
    return Entry("run", i, "c", "fp", 1.0, 0.1, 10, 1e-5, "rdp", 0.5 * i, "t")


def test_the_ledger_chain_detects_edits_and_deletions(tmp_path):
    path = tmp_path / "ledger.sqlite"
    with Ledger(path) as ledger:
        for i in (1, 2, 3):
            ledger.append(_entry(i))
        assert ledger.verify() == []
        with pytest.raises(sqlite3.DatabaseError, match="append-only"):
            ledger._db.execute("UPDATE entries SET body = '{}' WHERE seq = 2")
    db = sqlite3.connect(path)
    drop = "DROP TRIGGER entries_no_update; DROP TRIGGER entries_no_delete;"
    db.executescript(drop)
    db.execute("UPDATE entries SET body = replace(body, '\"epsilon\": 1.0', '\"epsilon\": 0.1')"
               " WHERE seq = 2")
    db.commit()
    with Ledger(path) as ledger:
        assert ledger.verify() == ["entry 2: contents do not match its hash (edited)"]
    db.executescript(drop)  # opening the ledger restored them
    db.execute("DELETE FROM entries WHERE seq = 2")
    db.commit()
    with Ledger(path) as ledger:
        problems = ledger.verify()
        assert "entry 2: missing (next stored entry is 3)" in problems


def test_a_file_that_is_not_a_ledger_is_refused(tmp_path):
    bad = tmp_path / "notes.sqlite"
    bad.write_text("not a database at all, just text " * 50)
    with pytest.raises(LedgerError, match="not a fedslm privacy ledger"):
        Ledger(bad)
    with pytest.raises(LedgerError, match="no ledger"):
        Ledger(tmp_path / "missing.sqlite", create=False)


def test_seeded_noise_is_recorded_as_no_noise(tiny_model, text_clients, tmp_path):
    """`reproducible` derives the noise from a seed: whoever knows the seed can subtract
    it, so the round's ε is ∞ in the reply and the ledger, and the audit agrees."""
    from privacy.audit import audit_ledger

    s = client_settings(tiny_model, text_clients, tmp_path, reproducible=True)
    _, metrics, info = train_round(s, {})
    assert metrics["noise-multiplier"] > 0 and metrics["epsilon"] == -1.0  # ∞ on the wire
    with Ledger(tmp_path / info["client"] / LEDGER_FILE) as ledger:
        (entry,) = ledger.entries()
    assert entry.seeded and entry.epsilon == float("inf") and entry.noise_multiplier > 0
    report = audit_ledger(tmp_path / info["client"] / LEDGER_FILE)
    assert report.ok and report.epsilon == float("inf")
    secret = client_settings(tiny_model, text_clients, tmp_path / "secret")
    assert train_round(secret, {})[1]["epsilon"] > 0  # a secret seed: finite
