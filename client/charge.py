"""Charging a round to the client's privacy ledger, before it trains.

The round's DP plan is decided here once: q from this client's data, σ for the run
(kept, see `kept_noise`), the clipping norm and the steps. If the data owner's budget
allows the round, its spend is appended to the ledger now: a crash after this still
counts as spent.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

from client.dp_plan import DPPlan, sample_rate
from client.settings import LOCAL_RUN, ClientSettings
from contracts.rundir import ledger_path
from privacy.accountant import CHARGED, epsilon
from privacy.budget import Budget, RoundPlan, plan_round
from privacy.ledger import Entry, Ledger


def charge_round(*, s: ClientSettings, client: str, num_examples: int,
                 dataset: str) -> tuple[RoundPlan, DPPlan, str]:
    """(the budget's verdict with ε before and after, the DP plan to train, the ledger's
    id). Unless the verdict refuses the round, the plan is in the ledger when this
    returns. ε is accounted under the replace-one relation (privacy/accountant.py)."""
    q = sample_rate(num_examples, s.batch_size)
    with Ledger(ledger_path(s.resolved_state_dir(client))) as ledger:
        entries = ledger.entries()
        this_run = [e for e in entries if e.run_id == s.run_id]
        verdict = plan_round(
            earlier_runs=[e.mechanism for e in entries if e.run_id != s.run_id],
            this_run=[e.mechanism for e in this_run],
            sample_rate=q, steps=s.local_steps, planned_steps=s.num_rounds * s.local_steps,
            delta=s.delta, target_epsilon=s.target_epsilon,
            budget=Budget(s.budget_epsilon, s.budget_delta),
            noise_multiplier=run_noise(s=s, entries=entries, sample_rate=q),
            private=s.dp, secret_noise=not s.reproducible,
        )
        plan = DPPlan(sample_rate=q, steps=s.local_steps, expected_batch=s.batch_size,
                      noise_multiplier=verdict.noise_multiplier,
                      clip_norm=s.clip_norm if s.dp else None)
        if not verdict.refused:
            ledger.append(ledger_entry(s=s, client=client, dataset=dataset, plan=plan,
                                       epsilon_after=verdict.epsilon_after))
        ledger_id = ledger.ledger_id
    return verdict, plan, ledger_id


def run_noise(*, s: ClientSettings, entries: list[Entry], sample_rate: float) -> float | None:
    """σ for this round when it is already known: the configured one, else the one kept
    from this run's earlier rounds; None when it must be searched (the client's first
    round of a run; a run the server did not name)."""
    if s.noise_multiplier is not None:
        return s.noise_multiplier
    if s.run_id == LOCAL_RUN or not s.dp:
        return None
    return kept_noise(entries=entries, run_id=s.run_id, sample_rate=sample_rate,
                      steps=s.local_steps, delta=s.delta, budget_epsilon=s.budget_epsilon)


def kept_noise(*, entries: list[Entry], run_id: str, sample_rate: float, steps: int,
               delta: float, budget_epsilon: float | None) -> float | None:
    """The σ this run was charged at, when a search now would give the same: the search
    depends on q, steps, rounds, δ, the target and budget ε and the spend of other runs,
    so σ is kept only while the ledger's last entry is this run's, charged for the same
    inputs, with noise. Another run's entry after it (a node serving two runs) changes
    the other runs' spend: then σ is searched again."""
    if not entries:
        return None
    last = entries[-1]
    same = (last.run_id, last.sample_rate, last.steps, last.delta, last.budget_epsilon) == \
        (run_id, sample_rate, steps, delta, budget_epsilon)
    return last.noise_multiplier if same and last.noise_multiplier > 0 else None


def ledger_entry(*, s: ClientSettings, client: str, dataset: str, plan: DPPlan,
                 epsilon_after: float) -> Entry:
    return Entry(
        run_id=s.run_id, round=s.round, client=client, dataset=dataset,
        noise_multiplier=plan.noise_multiplier, sample_rate=plan.sample_rate,
        steps=plan.steps, delta=s.delta, accountant=CHARGED[0], relation=CHARGED[1],
        epsilon=epsilon_after, time=datetime.now(UTC).isoformat(timespec="seconds"),
        budget_epsilon=s.budget_epsilon, budget_delta=s.budget_delta,
        seeded=s.reproducible and plan.private,
    )


def spent_epsilon(*, path: Path, delta: float) -> tuple[float, str]:
    """(the cumulative ε of the ledger at `path`, its id); (0, "") when there is none."""
    if not path.is_file():
        return 0.0, ""
    with Ledger(path, create=False) as ledger:
        return epsilon(ledger.history(), delta), ledger.ledger_id
