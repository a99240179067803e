"""Accounting cross-checks, cumulative ε across recreated clients, and the ledger chain."""

from __future__ import annotations

import sqlite3

import pytest

from client.cache import Session
from client.rounds import train_round
from contracts.rundir import LEDGER_FILE
from privacy.accountant import epsilon, noise_for_target
from privacy.ledger import Entry, Ledger, LedgerError
from tests.helpers import client_settings

KNOWN = [(1.0, 0.016, 63 * 20)]  # NOTES.md: RDP 3.80, PRV 3.44, dp-accounting RDP 3.80


def test_independent_accountants_agree_on_a_known_setting():
    assert epsilon(KNOWN, 1e-5, "rdp") == pytest.approx(3.80, abs=0.01)
    assert epsilon(KNOWN, 1e-5, "dp-accounting-rdp") == pytest.approx(3.80, abs=0.01)
    assert epsilon(KNOWN, 1e-5, "prv") == pytest.approx(3.44, abs=0.03)


def test_edge_cases_of_epsilon():
    assert epsilon([], 1e-5) == 0.0
    assert epsilon([(0.0, 0.1, 5)], 1e-5) == float("inf")
    split = epsilon([(1.0, 0.016, 600), (1.0, 0.016, 660)], 1e-5)
    assert split == pytest.approx(epsilon(KNOWN, 1e-5), rel=1e-9)
    with pytest.raises(ValueError, match="unknown accountant"):
        epsilon(KNOWN, 1e-5, "magic")


def test_noise_for_target_is_the_smallest_that_fits():
    sigma = noise_for_target(8.0, 1e-5, 0.07, 30)
    assert epsilon([(sigma, 0.07, 30)], 1e-5) <= 8.0
    assert epsilon([(sigma * 0.99, 0.07, 30)], 1e-5) > 8.0 * 0.98
    with pytest.raises(ValueError, match="out of reach"):
        noise_for_target(1.0, 1e-5, 0.5, 30, prior=[(0.0, 0.5, 1)])


def test_cumulative_epsilon_of_a_recreated_client_equals_one_accountant(
        tiny_model, text_clients, tmp_path):
    from opacus.accountants import RDPAccountant

    reported = []
    for rnd in (1, 2, 3):
        Session.forget()  # Flower recreates the ClientApp: nothing survives in memory
        s = client_settings(tiny_model, text_clients, tmp_path, server_round=rnd, local_steps=3)
        _, metrics, info = train_round(s, {})
        reported.append(metrics["epsilon"])
    one = RDPAccountant()
    for _ in range(3 * 3):
        one.step(noise_multiplier=metrics["noise-multiplier"], sample_rate=metrics["sample-rate"])
    assert reported[0] < reported[1] < reported[2]
    assert reported[-1] == pytest.approx(one.get_epsilon(1e-5), rel=1e-9)
    assert reported[-1] <= 8.0  # the planned rounds land on the target ε
    with Ledger(tmp_path / info["client"] / LEDGER_FILE) as ledger:
        entries = ledger.entries()
        assert [e.round for e in entries] == [1, 2, 3]
        assert [e.epsilon for e in entries] == pytest.approx(reported)
        assert ledger.verify() == []


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
