"""Deciding a round's noise and whether the data owner's budget allows it.

`target-epsilon` is the plan: the cumulative ε the data should reach at the end of
this run (earlier runs' spend included), from which σ is derived. The budget is the
hard limit: a round whose spend would take cumulative ε (or δ) past it is refused.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from privacy.accountant import Mechanism, epsilon, noise_for_target


@dataclass(frozen=True)
class Budget:
    epsilon: float | None = None
    delta: float | None = None


@dataclass(frozen=True)
class RoundPlan:
    noise_multiplier: float
    epsilon_before: float
    epsilon_after: float
    refused: str = ""  # why the round may not run; empty when it may


def plan_round(
    *,
    earlier_runs: list[Mechanism],
    this_run: list[Mechanism],
    sample_rate: float,
    steps: int,
    planned_steps: int,
    delta: float,
    target_epsilon: float,
    budget: Budget,
    noise_multiplier: float | None = None,
    private: bool = True,
    secret_noise: bool = True,
) -> RoundPlan:
    """σ for this round and the cumulative ε it leads to, or why it is refused.

    `noise_multiplier`: fixed by the config or kept from this run's earlier rounds: used
    as is, no search. None: the smallest σ that keeps the planned steps within the target.
    `secret_noise` false (noise derived from a seed): σ is planned as for secret noise,
    but the round costs ε = ∞, since the noise can be subtracted by whoever knows the seed.
    """
    spent = earlier_runs + this_run
    before = epsilon(spent, delta)
    if budget.delta is not None and delta > budget.delta:
        return RoundPlan(0.0, before, before, f"δ={delta:g} exceeds the budget δ={budget.delta:g}")
    if not private:
        sigma = 0.0
    elif noise_multiplier is not None:
        sigma = noise_multiplier
    else:
        cap = min(target_epsilon, budget.epsilon if budget.epsilon is not None else math.inf)
        try:
            sigma = noise_for_target(cap, delta, sample_rate, planned_steps, prior=earlier_runs)
        except ValueError:
            return RoundPlan(0.0, before, before,
                             f"budget exhausted: ε={before:.3f} spent, no noise level fits "
                             f"{planned_steps} more steps under ε={cap:g}")
    after = epsilon(spent + [(sigma if secret_noise else 0.0, sample_rate, steps)], delta)
    if budget.epsilon is not None and after > budget.epsilon:
        return RoundPlan(sigma, before, after,
                         f"this round would bring ε to {after:.3f}, over the budget "
                         f"ε={budget.epsilon:g} ({before:.3f} spent)")
    return RoundPlan(sigma, before, after)
