"""`fedslm audit`: check ledgers and recompute ε from what they recorded.

For each ledger: is the hash chain intact, under which neighbouring relation was ε
charged, does ε recomputed from the recorded mechanisms by two independent accountants
of that relation match what was reported, is it within the data owner's budget. For a
run directory, also, both ways: does every spend the server saw in metrics.jsonl
appear in the client's ledger (a deleted, replaced or truncated ledger shows up here),
which of this run's charges the server never saw (a lost reply: spent all the same),
and which resets the server flagged while the run went on (server/spend.py). The
server's own user-level ledger (central DP) is checked by Flower's RdpAccountant too.
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
from privacy import device_record
from privacy.accountant import ADD_REMOVE, REPLACE_ONE, epsilon, flower_rdp
from privacy.ledger import Entry, Ledger, LedgerError

# two code bases each: Google's dp-accounting PLD and Koskela et al.'s Fourier
# accountant; Opacus' RDP and dp-accounting's RDP (entries from before replace-one)
ACCOUNTANTS = {REPLACE_ONE: ("pld", "fft"), ADD_REMOVE: ("rdp", "dp-accounting-rdp")}
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
    relation: str = ""
    ledger_id: str = ""
    accountants: dict[str, float | None] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # findings that are not problems
    history: list[dict[str, Any]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def _recompute(entries: list[Entry], delta: float, relation: str) -> dict[str, float | None]:
    """ε by each accountant of the relation; the latest entry's own accountant first."""
    history = [e.mechanism for e in entries]
    names = dict.fromkeys([entries[-1].accountant, *ACCOUNTANTS[relation]])
    out: dict[str, float | None] = {}
    for name in names:
        try:
            out[name] = epsilon(history, delta, name, relation)
        except (ImportError, ValueError):  # a machine without that library; out of its range
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
            ledger_id = ledger.ledger_id
    except (LedgerError, sqlite3.DatabaseError, ValueError, TypeError) as exc:
        # An SQLite file that no longer reads as a ledger: damaged, not merely foreign.
        return LedgerReport(str(path), path.parent.name, None, None, None, None, False, False,
                            problems=[f"ledger unreadable (truncated or corrupted): {exc}"])
    report = _report(path, entries, problems)
    report.ledger_id = ledger_id
    return report


def _report(path: Path, entries: list[Entry], problems: list[str]) -> LedgerReport:
    last = entries[-1] if entries else None
    delta = last.delta if last else None
    relation = last.relation if last else ""
    if last and relation not in ACCOUNTANTS:
        problems.append(f"unknown neighbouring relation {relation!r} in the latest entry")
    accountants = _recompute(entries, delta, relation) if relation in ACCOUNTANTS else {}
    values = [v for v in accountants.values() if v is not None]
    recomputed = values[0] if values else None
    if any(not _close(values[0], v) for v in values[1:]):
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
        relation=relation, accountants=accountants,
        history=[{"run_id": e.run_id, "round": e.round, "noise_multiplier": e.noise_multiplier,
                  "sample_rate": e.sample_rate, "steps": e.steps, "epsilon": e.epsilon,
                  "seeded": e.seeded} for e in entries],
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


def _cross_check(report: LedgerReport, lines: list[dict[str, Any]], run_id: str) -> None:
    """Both ways: every spend the server saw for this client must be in its ledger; a
    charge of this run the server never saw is noted (spent all the same)."""
    recorded = {(h["run_id"], h["round"]): h["epsilon"] for h in report.history}
    seen = set()
    for line in lines:
        for row in line.get("clients", []):
            if row.get("client") != report.client or row.get("status") != Status.TRAINED:
                continue
            key = (run_id, line["round"])
            seen.add(key)
            if key not in recorded:
                report.problems.append(f"round {line['round']}: the server saw a spend that "
                                       "is missing from the ledger (deleted, replaced or "
                                       "truncated)")
                report.chain_intact = False
            elif row.get("epsilon") is not None and not _close(row["epsilon"], recorded[key]):
                report.problems.append(f"round {line['round']}: metrics report "
                                       f"ε={row['epsilon']:.4f}, the ledger {recorded[key]:.4f}")
    unseen = sorted(r for (run, r) in recorded if run == run_id and (run, r) not in seen)
    if unseen:
        report.notes.append(f"rounds {unseen}: charged in the ledger, no update used by the "
                            "server (a lost reply, a refusal or a rejection): spent all the same")


def _missing_ledgers(reports: list[LedgerReport], lines: list[dict[str, Any]],
                     ledgers_dir: Path) -> list[LedgerReport]:
    """A report for every client the server saw train whose ledger is not there at all."""
    have = {r.client for r in reports}
    trained = sorted({row["client"] for line in lines for row in line.get("clients", [])
                      if row.get("status") == Status.TRAINED and row["client"] not in have})
    return [LedgerReport(str(ledgers_dir / name / rundir.LEDGER_FILE), name, None, None, None,
                         None, False, False,
                         problems=["the server saw this client spend privacy, but its "
                                   "ledger is missing (deleted?)"]) for name in trained]


def _server_check(report: LedgerReport, config: dict[str, Any]) -> None:
    """The central-DP ledger, by Flower's own RdpAccountant as well (same model: Poisson
    sampling of the run's clients, add/remove one client)."""
    if report.client != rundir.SERVER_CLIENT or not report.history or report.delta is None:
        return
    history = [(0.0 if h["seeded"] else h["noise_multiplier"], h["sample_rate"], h["steps"])
               for h in report.history]  # seeded noise is no noise (privacy/ledger.py)
    try:
        value = flower_rdp(history, report.delta, int(config["num-clients"]))
    except ValueError as exc:  # Flower's events need whole samples of the population
        report.notes.append(f"Flower's RdpAccountant does not apply: {exc}")
        return
    except ImportError:
        return
    report.accountants["flower-rdp"] = value
    if report.epsilon is not None and not _close(value, report.epsilon):
        report.problems.append(f"Flower's RdpAccountant gives ε={value:.4f}, the ledger's "
                               f"accountants {report.epsilon:.4f}")


def audit(path: str | Path) -> dict[str, Any]:
    """The `fedslm audit --json` object: {"ok", "clients": [...]}."""
    path = Path(path)
    if path.is_dir() and (path / device_record.FILE).is_file():
        return audit_device(path)
    if path.is_dir():
        ledgers, config = _run_ledgers(path)
        lines = _metrics(path)
        local = config.get(rundir.LEDGERS) == "local"
        if not ledgers and (local or not lines):
            raise AuditInputError(f"no privacy ledgers in run directory {path}")
        reports = [audit_ledger(p) for p in ledgers]
        run_id = config.get("run-id", path.name)
        for report in reports:
            if report.history or report.problems:
                _cross_check(report, lines, run_id)
            _server_check(report, config)
        if local:
            reports += _missing_ledgers(reports, lines, rundir.client_state_root(
                path, config.get("state-root") or ""))
    elif path.is_file():
        reports, lines = [audit_ledger(path)], []
    else:
        raise AuditInputError(f"no such run directory or ledger: {path}")
    clients = [{**asdict(r), "ok": r.ok} for r in reports]
    flags = [{"round": line["round"], **flag} for line in lines
             for flag in line.get("privacy_flags") or []] if path.is_dir() else []
    result: dict[str, Any] = {"ok": all(r.ok for r in reports) and not flags,
                              "clients": clients, "privacy_flags": flags}
    if path.is_dir() and not local:
        result["note"] = ("the clients' ledgers are on their devices: audit each there "
                          "(fedslm audit <state-dir>/ledger.sqlite)")
    empirical = path / rundir.AUDIT / rundir.EMPIRICAL if path.is_dir() else None
    if empirical and empirical.is_file():
        result["empirical"] = _check_empirical(json.loads(empirical.read_text()))
        result["ok"] = result["ok"] and not result["empirical"]["problems"]
    return result


def audit_device(state: Path) -> dict[str, Any]:
    """A deployed device's state folder: its ledger, its lifetime spend per run and
    coordinator, the policy it runs under and every refusal with its reason."""
    ledger = rundir.ledger_path(state)
    reports = [audit_ledger(ledger)] if ledger.is_file() else []
    try:
        with device_record.DeviceState(state, create=False) as record:
            plans, refusals, policies = record.plans(), record.refusals(), record.policies()
    except sqlite3.DatabaseError as exc:
        raise AuditInputError(f"{state / device_record.FILE} is unreadable: {exc}") from None
    entries = _entries(ledger) if ledger.is_file() else []
    policy = policies[-1][1] if policies else {}
    runs = []
    for run_id in dict.fromkeys(e.run_id for e in entries):
        mine = [e for e in entries if e.run_id == run_id]
        plan = next((p for p in plans if p[3].get("run-id") == run_id), None)
        runs.append({"run_id": run_id, "coordinator": plan[1] if plan else "-",
                     "rounds": len(mine), "planned_rounds": plan[3].get("num-server-rounds")
                     if plan else None, "epsilon": epsilon([e.mechanism for e in mine],
                                                           mine[-1].delta),
                     "epsilon_after": mine[-1].epsilon})
    problems = []
    cap = policy.get("max-epsilon-per-run") or policy.get("budget-epsilon")
    problems += [f"run {r['run_id']}: ε={r['epsilon']:.4f} is over the policy's per-run "
                 f"ε={cap:g}" for r in runs if cap and r["epsilon"] > cap * (1 + 1e-9)]
    clients = [{**asdict(r), "ok": r.ok} for r in reports]
    return {"ok": all(r.ok for r in reports) and not problems, "clients": clients,
            "privacy_flags": [], "device": {
                "state": str(state), "policy": policy, "policy_since": policies[-1][0]
                if policies else None, "runs": runs, "problems": problems,
                "refusals": [asdict(r) for r in refusals]}}


def _entries(ledger: Path) -> list[Entry]:
    try:
        with Ledger(ledger, create=False) as opened:
            return opened.entries()
    except (LedgerError, sqlite3.DatabaseError, ValueError, TypeError):
        return []  # audit_ledger reports it


def _printable(text: Any) -> str:
    """Text that came from a coordinator, safe for a terminal."""
    return "".join(c if c.isprintable() else "?" for c in str(text))


def _render_device(device: dict[str, Any]) -> list[str]:
    policy = device["policy"]
    lines = [f"device {device['state']}: policy since {device['policy_since'] or '-'}: "
             + (", ".join(f"{k}={v}" for k, v in sorted(policy.items())) or "none recorded")]
    for r in device["runs"]:
        planned = r["planned_rounds"] if r["planned_rounds"] is not None else "?"
        lines.append(_printable(
            f"  run {r['run_id']} ({r['coordinator']}): {r['rounds']} of {planned} rounds, "
            f"ε of the run {_fmt(r['epsilon'])}, cumulative after it "
            f"{_fmt(r['epsilon_after'])}"))
    lines += [_printable(f"  refused {f['time']} run {f['run']} round {f['round']} "
                         f"{f['kind']} ({f['coordinator']}): {f['code']}: {f['reason']}")
              for f in device["refusals"]]
    lines += [f"  {p}" for p in device["problems"]]
    return lines


def _metrics(run_dir: Path) -> list[dict[str, Any]]:
    try:
        return rundir.read_metrics(run_dir)
    except rundir.RunDirError as exc:
        raise AuditInputError(f"metrics.jsonl of {run_dir} is unreadable: {exc}") from None


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
    """A table a person can read, then each problem and note on its own line."""
    head = ("client", "relation", "ε by accountant", "reported", "δ", "budget", "left",
            "entries", "chain", "status")
    rows = [head]
    for c in result["clients"]:
        left = None if c["budget_epsilon"] is None or c["epsilon"] is None \
            else c["budget_epsilon"] - c["epsilon"]
        by = ", ".join(f"{name} {_fmt(v)}" for name, v in c["accountants"].items()) or "-"
        rows.append((
            c["client"], c["relation"] or "-", by, _fmt(c["epsilon_reported"]),
            f"{c['delta']:g}" if c["delta"] else "-", _fmt(c["budget_epsilon"], 2),
            _fmt(left, 2), str(len(c["history"])), "intact" if c["chain_intact"] else "BROKEN",
            "ok" if c["ok"] else "PROBLEM",
        ))
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip()
             for r in rows]
    for c in result["clients"]:
        lines += [f"{c['client']} ({c['ledger']}): {p}" for p in c["problems"]]
        lines += [f"{c['client']}: note: {n}" for n in c.get("notes", [])]
    lines += [f"round {f['round']}: the server flagged {f['client']}: {f['problem']}"
              for f in result.get("privacy_flags", [])]
    if result.get("note"):
        lines.append(result["note"])
    if "device" in result:
        lines += _render_device(result["device"])
    if "empirical" in result:
        e = result["empirical"]
        eps = format_epsilon(e.get("epsilon_accountant"), 3)
        ceiling = e.get("epsilon_ceiling")
        lines += [
            f"empirical audit ({e['canaries']} canaries, {e['included']} planted): "
            f"membership AUC {e['auc']:.3f}, TPR at 1% FPR {e['tpr_at_1pct_fpr']:.3f}, "
            f"exposure {e['exposure_mean']:.2f} of {e['exposure_max_possible']:.2f} bits",
            f"  ε lower bound {e['epsilon_lower_bound']:.3f} ({e['confidence']:.0%} confidence, "
            f"δ={e.get('delta', 0):g}, {e['correct_guesses']}/{e['guesses']} guesses right) "
            f"vs accountant ε {eps}",
            *([f"  the most {e['canaries']} canaries can certify, every guess right: ε "
               f"{ceiling:.3f}; an accountant's ε above it cannot be refuted by this audit"]
              if ceiling is not None else []),
            *[f"  {p}" for p in e["problems"]],
        ]
    lines.append("audit: ok" if result["ok"] else "audit: PROBLEMS FOUND")
    return "\n".join(lines)
