"""A deployed device's rounds: each coordinator message served under the owner's policy.

The coordinator's run config is read as a request (client/policy.py): the keys the owner
decides come from the policy, anything looser than the policy is refused. A run's DP
plan (σ, q, steps, rounds and what they were derived from) is fixed when the device
first trains for it (privacy/device_record.py): a later message that changes it, or a
train message beyond the planned rounds, is refused, so the run's spend never exceeds
what its plan was accepted for. What the server hears of a refusal or a failure is a
code from client.policy.CODES; the reason goes to the device's log and its record.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from flwr.app import Message, MessageType

from client import policy as policy_mod
from client.messages import arrays_of, config_of, error_reply, evaluate_reply, train_reply
from client.policy import BAD_PLAN, INTERNAL, OVER_BUDGET, REFUSED_BY_POLICY, Policy, Refusal
from client.settings import ClientSettings
from contracts import wire as w
from contracts.rundir import ledger_path
from privacy.device_record import DeviceState

log = logging.getLogger("fedslm.device")
# what fixes a run's DP plan: the config keys σ, q, steps and rounds are derived from
PLAN_KEYS = ("run-id", "num-server-rounds", "local-steps", "batch-size", "seq-len", "delta",
             "dp", "target-epsilon", "noise-multiplier")


@dataclass(frozen=True)
class Device:
    policy: Policy
    node_config: dict[str, Any]  # the node's own keys (device, threads, profile ...), checked
    state_dir: Path
    coordinator: str  # the SuperLink this device serves; `handle` adds who submitted the run

    def handle(self, msg: Message, coordinator: str = "") -> Message:
        """The reply to one message; never raises."""
        kind = msg.metadata.message_type.split(".")[0]
        run = str(msg.metadata.run_id)
        who = f"{self.coordinator} ({coordinator})" if coordinator else self.coordinator
        config = config_of(msg)
        rnd = _int(config.get(w.SERVER_ROUND, 0))
        try:
            if kind not in (MessageType.TRAIN, MessageType.EVALUATE):
                raise Refusal(REFUSED_BY_POLICY, f"message type {kind!r} is not served")
            return self._serve(kind, msg, config, run, who)
        except Refusal as refusal:
            return self._refuse(msg, run, who, rnd, kind, refusal.code, refusal.reason)
        except Exception as exc:  # noqa: BLE001 - the server learns only that it failed
            log.exception("run %s round %d: %s failed", run, rnd, kind)
            return self._refuse(msg, run, who, rnd, kind, INTERNAL,
                                f"{type(exc).__name__}: {exc}")

    def settings(self, config: dict[str, Any]) -> ClientSettings:
        """The round's settings: the run config as the policy allows it, the owner's keys
        and the node's own; Refusal otherwise."""
        run, owner = policy_mod.apply(self.policy, config)
        for note in policy_mod.ignored_keys(self.policy, config):
            log.info("the run config asks for %s: ignored, this device's policy decides", note)
        node = {**self.node_config, **owner, "state-dir": str(self.state_dir),
                "cache-dir": str(self.state_dir / "cache")}
        node.setdefault("client", self.state_dir.name)
        ids = {k: config[k] for k in (w.RUN_ID, w.SERVER_ROUND) if k in config}
        return ClientSettings.from_records({**run, **ids}, node)

    def _serve(self, kind: str, msg: Message, config: dict[str, Any], run: str,
               who: str) -> Message:
        from client.rounds import run_round

        s = self.settings(config)
        if kind == MessageType.EVALUATE:
            return evaluate_reply(msg, run_round(kind, s, arrays_of(msg))[1])
        s = self._hold_to_plan(s, config, run, who)
        _, (arrays, metrics, info) = run_round(kind, s, arrays_of(msg))
        if info[w.STATUS].startswith(w.Status.REFUSED.value):
            reason = info[w.STATUS].partition(": ")[2]
            self._record(run, who, s.round, kind, OVER_BUDGET, reason)
            info = {**info, w.STATUS: w.status_text(w.Status.REFUSED, OVER_BUDGET)}
        return train_reply(msg, (arrays, metrics, info))

    def _hold_to_plan(self, s: ClientSettings, config: dict[str, Any], run: str,
                      who: str) -> ClientSettings:
        """The settings with the run's σ; the plan recorded at the run's first training
        round; Refusal for a changed plan or a round beyond it."""
        from client.cache import Session
        from client.dp_plan import sample_rate

        n = len(Session.get(s).train)
        fixed = {**{k: _plain(config.get(k)) for k in PLAN_KEYS},
                 "sample-rate": sample_rate(n, s.batch_size)}
        with DeviceState(self.state_dir) as state:
            plan = state.plan(run)
            if plan is None:
                _check_run_id(fixed["run-id"], state)
                plan = {**fixed, **self._new_plan(s, fixed["sample-rate"])}
                state.accept(run, who, plan)
                log.info("run %s: plan accepted: sigma %.4f, q %.4f, %d steps x %d rounds, "
                         "epsilon of the run %.3f", run, plan["sigma"], plan["sample-rate"],
                         s.local_steps, s.num_rounds, plan["run-epsilon"])
        changed = [k for k in fixed if plan.get(k) != fixed[k]]
        if changed:
            k = changed[0]
            raise Refusal(BAD_PLAN, f"the run changed its plan: {k} was {plan.get(k)!r} when "
                          f"the device accepted the run, now {fixed[k]!r}")
        charged = _charged_rounds(s)
        if charged >= s.num_rounds:
            raise Refusal(BAD_PLAN, f"a training round beyond the plan: {charged} of "
                          f"{s.num_rounds} planned rounds were already charged")
        if not s.dp:  # allowed by the policy: its spend is ∞, the budget no longer applies
            return replace(s, budget_epsilon=None, budget_delta=None)
        return replace(s, noise_multiplier=plan["sigma"])

    def _new_plan(self, s: ClientSettings, q: float) -> dict[str, Any]:
        """σ for the whole run and the run's own ε. σ is the larger of what the run asks
        for (a fixed σ, or the one its target gives) and what keeps the run's own ε within
        the policy's max-epsilon-per-run: more noise is always allowed. Refusal
        (over-budget) when the run's target is spent or its plan passes the lifetime budget."""
        from privacy.accountant import epsilon, noise_for_target
        from privacy.budget import Budget, plan_round
        from privacy.ledger import Ledger

        planned = s.num_rounds * s.local_steps
        if not s.dp:
            return {"sigma": 0.0, "run-epsilon": None}
        with Ledger(ledger_path(self.state_dir)) as ledger:
            earlier = [e.mechanism for e in ledger.entries() if e.run_id != s.run_id]

        def verdict(sigma: float | None):
            return plan_round(earlier_runs=earlier, this_run=[], sample_rate=q, steps=planned,
                              planned_steps=planned, delta=s.delta,
                              target_epsilon=s.target_epsilon,
                              budget=Budget(s.budget_epsilon, s.budget_delta),
                              noise_multiplier=sigma)

        asked = s.noise_multiplier
        if asked is None:  # searched for the run's target, within the budget
            searched = verdict(None)
            if searched.refused:
                raise Refusal(OVER_BUDGET, f"the run's plan does not fit: {searched.refused}")
            asked = searched.noise_multiplier
        sigma, cap = asked, self.policy.per_run_epsilon
        run_epsilon = epsilon([(sigma, q, planned)], s.delta)
        if run_epsilon > cap:
            try:
                sigma = noise_for_target(cap, s.delta, q, planned)
            except ValueError as exc:  # no σ up to 1e4 keeps the run within the cap
                raise Refusal(OVER_BUDGET, f"the run's plan does not fit: {exc}") from None
            run_epsilon = epsilon([(sigma, q, planned)], s.delta)
            log.info("run %s: sigma %.4f raised to %.4f to keep the run within the policy's "
                     "max-epsilon-per-run=%g", s.run_id, asked, sigma, cap)
        if sigma != asked or s.noise_multiplier is not None:  # not yet checked: the budget
            final = verdict(sigma)
            if final.refused:
                raise Refusal(OVER_BUDGET, f"the run's plan does not fit: {final.refused}")
        return {"sigma": sigma, "run-epsilon": run_epsilon}

    def _refuse(self, msg: Message, run: str, who: str, rnd: int, kind: str, code: str,
                reason: str) -> Message:
        self._record(run, who, rnd, kind, code, reason)
        return error_reply(msg, code)

    def _record(self, run: str, who: str, rnd: int, kind: str, code: str, reason: str) -> None:
        log.warning("run %s round %d: %s refused (%s): %s", run, rnd, kind, code, reason)
        try:
            with DeviceState(self.state_dir) as state:
                state.refuse(run, who, rnd, kind, code, reason)
        except Exception:  # noqa: BLE001 - the log line above holds it
            log.exception("could not record the refusal in %s", self.state_dir)


def _check_run_id(run_id: Any, state: DeviceState) -> None:
    """The ledger knows a run by the server's `run-id`: a new run must name itself, and
    not as a run this device already planned (its spend would be counted as that run's)."""
    if not isinstance(run_id, str) or not run_id:
        raise Refusal(BAD_PLAN, f"the run names itself {run_id!r}: not a run id")
    if any(plan.get("run-id") == run_id for _, _, _, plan in state.plans()):
        raise Refusal(BAD_PLAN, f"run-id {run_id!r} is an earlier run's")


def _charged_rounds(s: ClientSettings) -> int:
    from privacy.ledger import Ledger

    with Ledger(ledger_path(s.resolved_state_dir(s.client))) as ledger:
        return sum(1 for e in ledger.entries() if e.run_id == s.run_id)


def _plain(value: Any) -> Any:
    return value if value is None or isinstance(value, bool | int | float | str) else str(value)


def _int(value: Any) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return 0
