"""`fedslm audit`: check ledgers and recompute ε from what they recorded.

For each ledger: is the hash chain intact, does ε recomputed from the recorded
mechanisms (by two independent accountants) match what was reported, is it within
the data owner's budget. For a run directory, also: does every spend the server
saw in metrics.jsonl appear in the client's ledger (a deleted or truncated tail
shows up here).
"""

from __future__ import annotations

import json
import math
import sqlite3
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from contracts import rundir
from contracts.errors import FedslmError
from contracts.rundir import finite
from contracts.wire import Status, format_epsilon
from privacy.accountant import epsilon
from privacy.ledger import Entry, Ledger, LedgerError

ACCOUNTANTS = ("rdp", "dp-accounting-rdp")  # Opacus and Google: two code bases
AGREEMENT = 0.01  # relative tolerance between accountants and against the reported ε
SQLITE_MAGIC = b"SQLite format 3\x00"


class AuditInputError(FedslmError):
    """The path cannot be read as a run directory or a ledger (exit 2)."""


@dataclass
class LedgerReport:
    ledger: str
    client: str
    epsilon: float | None  # recomputed (first accountant)
    epsilon_reported: float | None
    delta: float | None
    budget_epsilon: float | None
    within_budget: bool
    chain_intact: bool
    accountants: dict[str, float | None] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def _recompute(entries: list[Entry], delta: float) -> dict[str, float | None]:
    history = [e.mechanism for e in entries]
    out: dict[str, float | None] = {}
    for name in ACCOUNTANTS:
        try:
            out[name] = epsilon(history, delta, name)
        except ImportError:  # an auditor's machine without that library
            out[name] = None
    return out


def _close(a: float, b: float) -> bool:
    if math.isinf(a) or math.isinf(b):
        return a == b
    return abs(a - b) <= AGREEMENT * max(abs(a), abs(b), 1e-9)


def audit_ledger(path: Path) -> LedgerReport:
    """Raises AuditInputError when `path` is not a ledger at all."""
    try:
        magic = path.read_bytes()[:16]
    except OSError as exc:
        raise AuditInputError(f"cannot read {path}: {exc}") from exc
    if magic != SQLITE_MAGIC:
        raise AuditInputError(f"{path} is not a fedslm privacy ledger")
    try:
        with Ledger(path, create=False) as ledger:
            problems = ledger.verify()
            entries = ledger.entries()
    except (LedgerError, sqlite3.DatabaseError, ValueError, TypeError) as exc:
        # An SQLite file that no longer reads as a ledger: damaged, not merely foreign.
        return LedgerReport(str(path), path.parent.name, None, None, None, None, False, False,
                            problems=[f"ledger unreadable (truncated or corrupted): {exc}"])
    return _report(path, entries, problems)


def _report(path: Path, entries: list[Entry], problems: list[str]) -> LedgerReport:
    last = entries[-1] if entries else None
    delta = last.delta if last else None
    accountants = _recompute(entries, delta) if last else {}
    values = [v for v in accountants.values() if v is not None]
    recomputed = values[0] if values else None
    if len(values) > 1 and not _close(values[0], values[1]):
        problems.append(f"accountants disagree: {accountants}")
    if last and recomputed is not None and not _close(recomputed, last.epsilon):
        problems.append(f"reported ε={last.epsilon:.4f} but the recorded mechanisms give "
                        f"ε={recomputed:.4f}")
    for i, e in enumerate(entries, start=1):
        if e.delta != delta:
            problems.append(f"entry {i}: δ={e.delta:g} differs from the latest δ={delta:g}")
            break
    budget = last.budget_epsilon if last else None
    within = budget is None or (recomputed is not None and recomputed <= budget * (1 + 1e-9))
    if not within:
        problems.append(f"ε={recomputed:.4f} is over the budget ε={budget:g}")
    chain_intact = not any("hash" in p or "missing" in p for p in problems)
    return LedgerReport(
        ledger=str(path), client=last.client if last else path.parent.name,
        epsilon=recomputed, epsilon_reported=last.epsilon if last else None, delta=delta,
        budget_epsilon=budget, within_budget=within, chain_intact=chain_intact,
        accountants=accountants,
        history=[{"run_id": e.run_id, "round": e.round, "noise_multiplier": e.noise_multiplier,
                  "sample_rate": e.sample_rate, "steps": e.steps, "epsilon": e.epsilon}
                 for e in entries],
        problems=problems,
    )


def _run_ledgers(run_dir: Path) -> tuple[list[Path], dict[str, Any]]:
    try:
        config = rundir.read_config(run_dir)
    except rundir.RunDirError as exc:
        raise AuditInputError(f"{run_dir} is not a fedslm run directory ({exc})") from None
    ledgers = rundir.client_ledgers(run_dir, config.get("state-root") or "")
    if rundir.server_ledger(run_dir).is_file():
        ledgers.append(rundir.server_ledger(run_dir))
    return ledgers, config


def _cross_check(report: LedgerReport, run_dir: Path, run_id: str) -> None:
    """Every spend the server saw for this client must be in its ledger."""
    recorded = {(h["run_id"], h["round"]): h["epsilon"] for h in report.history}
    try:
        lines = rundir.read_metrics(run_dir)
    except rundir.RunDirError as exc:
        report.problems.append(f"metrics.jsonl unreadable: {exc}")
        return
    for line in lines:
        for row in line.get("clients", []):
            if row.get("client") != report.client or row.get("status") != Status.TRAINED:
                continue
            key = (run_id, line["round"])
            if key not in recorded:
                report.problems.append(f"round {line['round']}: the server saw a spend that "
                                       "is missing from the ledger (deleted or truncated)")
                report.chain_intact = False
            elif row.get("epsilon") is not None and not _close(row["epsilon"], recorded[key]):
                report.problems.append(f"round {line['round']}: metrics report "
                                       f"ε={row['epsilon']:.4f}, the ledger {recorded[key]:.4f}")


def audit(path: str | Path) -> dict[str, Any]:
    """The `fedslm audit --json` object: {"ok", "clients": [...]}."""
    path = Path(path)
    if path.is_dir():
        ledgers, config = _run_ledgers(path)
        if not ledgers:
            raise AuditInputError(f"no privacy ledgers in run directory {path}")
        reports = [audit_ledger(p) for p in ledgers]
        for report in reports:
            if report.history or report.problems:
                _cross_check(report, path, config.get("run-id", path.name))
    elif path.is_file():
        reports = [audit_ledger(path)]
    else:
        raise AuditInputError(f"no such run directory or ledger: {path}")
    clients = [{**asdict(r), "ok": r.ok} for r in reports]
    result: dict[str, Any] = {"ok": all(r.ok for r in reports), "clients": clients}
    empirical = path / rundir.AUDIT / rundir.EMPIRICAL if path.is_dir() else None
    if empirical and empirical.is_file():
        result["empirical"] = _check_empirical(json.loads(empirical.read_text()))
        result["ok"] = result["ok"] and not result["empirical"]["problems"]
    return result


def _check_empirical(found: dict[str, Any]) -> dict[str, Any]:
    """A lower bound above the accountant's ε means the DP guarantee is broken."""
    bound, eps = found["epsilon_lower_bound"], found.get("epsilon_accountant")
    problems = []
    if found.get("dp") and eps is not None and bound > eps * (1 + 1e-9):
        problems.append(f"the empirical ε lower bound {bound:.3f} exceeds the accountant's "
                        f"ε={eps:.3f}: the DP implementation or its accounting is wrong")
    return {**found, "problems": problems}


def as_json(result: dict[str, Any]) -> str:
    return json.dumps(finite(result), indent=2, allow_nan=False)


def _fmt(value: float | None, digits: int = 3) -> str:
    if value is None:
        return "-"
    return "inf" if math.isinf(value) else f"{value:.{digits}f}"


def render(result: dict[str, Any]) -> str:
    """A table a person can read, then each problem on its own line."""
    head = ("client", "ε (Opacus RDP)", "ε (dp-accounting)", "reported", "δ", "budget", "left",
            "entries", "chain", "status")
    rows = [head]
    for c in result["clients"]:
        left = None if c["budget_epsilon"] is None or c["epsilon"] is None \
            else c["budget_epsilon"] - c["epsilon"]
        rows.append((
            c["client"], _fmt(c["accountants"].get("rdp")),
            _fmt(c["accountants"].get("dp-accounting-rdp")), _fmt(c["epsilon_reported"]),
            f"{c['delta']:g}" if c["delta"] else "-", _fmt(c["budget_epsilon"], 2),
            _fmt(left, 2), str(len(c["history"])), "intact" if c["chain_intact"] else "BROKEN",
            "ok" if c["ok"] else "PROBLEM",
        ))
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip()
             for r in rows]
    for c in result["clients"]:
        lines += [f"{c['client']} ({c['ledger']}): {p}" for p in c["problems"]]
    if "empirical" in result:
        e = result["empirical"]
        eps = format_epsilon(e.get("epsilon_accountant"), 3)
        lines += [
            f"empirical audit ({e['canaries']} canaries, {e['included']} planted): "
            f"membership AUC {e['auc']:.3f}, TPR at 1% FPR {e['tpr_at_1pct_fpr']:.3f}, "
            f"exposure {e['exposure_mean']:.2f} of {e['exposure_max_possible']:.2f} bits",
            f"  ε lower bound {e['epsilon_lower_bound']:.3f} ({e['confidence']:.0%} confidence, "
            f"{e['correct_guesses']}/{e['guesses']} guesses right) vs accountant ε {eps}",
            *[f"  {p}" for p in e["problems"]],
        ]
    lines.append("audit: ok" if result["ok"] else "audit: PROBLEMS FOUND")
    return "\n".join(lines)
