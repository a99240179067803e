"""The round's DP plan: decided once, charged before training, run exactly by the trainer;
σ searched at a client's first round of a run and kept from its ledger after."""

from __future__ import annotations

import inspect

import pytest
import torch

from client import trainer
from client.adapter import attach_lora
from client.base_model import Quantization, load_base
from client.cache import Session
from client.charge import charge_round, kept_noise, ledger_entry, run_noise, spent_epsilon
from client.data import encode, partition
from client.dp_plan import DPPlan, PlanError
from client.rounds import train_round
from contracts.rundir import LEDGER_FILE
from privacy import budget
from privacy.accountant import noise_for_target
from privacy.ledger import Entry, Ledger
from tests.helpers import client_settings


def _examples_and_model(tiny_model, text_clients):
    base, tokenizer = load_base(str(tiny_model), Quantization("none", "float32", "test"),
                                torch.device("cpu"))
    model = attach_lora(base, 4, 8.0, 0.0, ["q_proj", "v_proj"], 0)
    return encode(partition(str(text_clients), 0), tokenizer, 32, 8)[0], model


@pytest.fixture
def searches(monkeypatch) -> list[tuple]:
    """The σ searches the budget planner runs."""
    calls: list[tuple] = []

    def counted(*args, **kwargs):
        calls.append(args)
        return noise_for_target(*args, **kwargs)

    monkeypatch.setattr(budget, "noise_for_target", counted)
    return calls


def _rounds(tiny_model, text_clients, state, run_id: str) -> list[dict]:
    out = []
    for rnd in (1, 2, 3):
        Session.forget()  # a fresh process each round: σ can only come from the ledger
        s = client_settings(tiny_model, text_clients, state, server_round=rnd, local_steps=3,
                            run_id=run_id)
        out.append(train_round(s, {})[1])
    Session.forget()
    return out


def test_sigma_is_searched_once_per_run_and_equals_a_fresh_search(tiny_model, text_clients,
                                                                   tmp_path, searches):
    metrics = _rounds(tiny_model, text_clients, tmp_path, "run-a")
    assert len(searches) == 1  # the first round only
    q = metrics[0]["sample-rate"]
    fresh = noise_for_target(8.0, 1e-5, q, 3 * 3)
    assert [m["noise-multiplier"] for m in metrics] == [fresh] * 3
    with Ledger(tmp_path / "client-0" / LEDGER_FILE) as ledger:
        assert [e.noise_multiplier for e in ledger.entries()] == [fresh] * 3

    later = _rounds(tiny_model, text_clients, tmp_path, "run-b")  # a new run: a new search
    assert len(searches) == 2
    prior = [(fresh, q, 3)] * 3
    assert [m["noise-multiplier"] for m in later] == \
        [noise_for_target(8.0, 1e-5, q, 9, prior=prior)] * 3


def _entry(**changes) -> Entry:
    fields = dict(run_id="r", round=1, client="c", dataset="d", noise_multiplier=1.5,
                  sample_rate=0.1, steps=3, delta=1e-5, accountant="rdp", epsilon=1.0, time="t")
    return Entry(**{**fields, **changes})


def test_a_sigma_is_kept_only_for_the_inputs_it_was_searched_for():
    same = dict(run_id="r", sample_rate=0.1, steps=3, delta=1e-5, budget_epsilon=None)
    assert kept_noise(entries=[_entry()], **same) == 1.5
    assert kept_noise(entries=[], **same) is None
    assert kept_noise(entries=[_entry(sample_rate=0.2)], **same) is None  # other data
    assert kept_noise(entries=[_entry(budget_epsilon=4.0)], **same) is None  # another budget
    assert kept_noise(entries=[_entry(noise_multiplier=0.0)], **same) is None  # no noise
    # another run charged the ledger after this run's last round: its spend changes the
    # search, so σ is searched again (a kept σ could overshoot the target)
    assert kept_noise(entries=[_entry(), _entry(run_id="other")], **same) is None
    assert kept_noise(entries=[_entry(run_id="other"), _entry()], **same) == 1.5


def test_another_runs_spend_mid_run_gives_what_a_fresh_search_gives(tiny_model, text_clients,
                                                                    tmp_path):
    s = client_settings(tiny_model, text_clients, tmp_path, local_steps=3, run_id="run-a")
    _, first, _ = charge_round(s=s, client="alice", num_examples=40, dataset="fp")
    other = client_settings(tiny_model, text_clients, tmp_path, local_steps=20, run_id="run-b",
                            noise_multiplier=1.0)
    charge_round(s=other, client="alice", num_examples=40, dataset="fp")
    later = client_settings(tiny_model, text_clients, tmp_path, local_steps=3, run_id="run-a",
                            server_round=2)
    verdict, plan, _ = charge_round(s=later, client="alice", num_examples=40, dataset="fp")
    with Ledger(tmp_path / "alice" / LEDGER_FILE) as ledger:
        entries = ledger.entries()
    earlier = [e.mechanism for e in entries[:-1] if e.run_id != "run-a"]
    assert not verdict.refused and len(earlier) == 1
    fresh = noise_for_target(8.0, 1e-5, 0.1, 9, prior=earlier)
    assert plan.noise_multiplier == fresh > first.noise_multiplier


def test_a_configured_sigma_is_used_as_it_is(tiny_model, text_clients, tmp_path):
    s = client_settings(tiny_model, text_clients, tmp_path, noise_multiplier=0.7)
    assert run_noise(s=s, entries=[_entry()], sample_rate=0.1) == 0.7


def test_a_run_the_server_did_not_name_never_reuses_sigma(tiny_model, text_clients, tmp_path):
    s = client_settings(tiny_model, text_clients, tmp_path, run_id="local")
    assert run_noise(s=s, entries=[_entry(run_id="local")], sample_rate=0.1) is None


def test_the_charged_plan_is_the_one_recorded(tiny_model, text_clients, tmp_path):
    s = client_settings(tiny_model, text_clients, tmp_path, local_steps=3)
    verdict, plan, ledger_id = charge_round(s=s, client="alice", num_examples=40, dataset="fp")
    assert not verdict.refused
    assert (plan.sample_rate, plan.steps, plan.expected_batch, plan.clip_norm) == \
        (4 / 40, 3, 4, 1.0)
    with Ledger(tmp_path / "alice" / LEDGER_FILE) as ledger:
        (entry,) = ledger.entries()
    assert entry.mechanism == (plan.noise_multiplier, plan.sample_rate, plan.steps)
    assert entry.epsilon == verdict.epsilon_after
    assert (entry.accountant, entry.relation) == ("pld", "replace-one")
    assert ledger_id == Ledger(tmp_path / "alice" / LEDGER_FILE).ledger_id


def test_the_trainer_refuses_data_the_plan_was_not_made_for(tiny_model, text_clients):
    examples, model = _examples_and_model(tiny_model, text_clients)
    plan = DPPlan.for_data(num_examples=len(examples) + 1, batch_size=8, steps=2,
                           noise_multiplier=1.0, clip_norm=1.0)
    with pytest.raises(PlanError, match="sample rate"):
        trainer.train(model, examples, plan=plan, lr=0.5, sampling=torch.Generator())


def test_the_trainer_checks_that_every_charged_step_was_noised(tiny_model, text_clients,
                                                                monkeypatch):
    examples, model = _examples_and_model(tiny_model, text_clients)
    real, calls = trainer.backward, []

    def skip_the_second(forward, optimizer, *args, **kwargs):
        out = real(forward, optimizer, *args, **kwargs)
        calls.append(1)
        if len(calls) == 2:  # a bug that leaves a step without noise
            optimizer.signal_skip_step(do_skip=True)
        return out

    monkeypatch.setattr(trainer, "backward", skip_the_second)
    plan = DPPlan.for_data(num_examples=len(examples), batch_size=8, steps=3,
                           noise_multiplier=1.0, clip_norm=1.0)
    with pytest.raises(PlanError, match="ran 2 noised steps; 3 were charged"):
        trainer.train(model, examples, plan=plan, lr=0.5,
                      sampling=torch.Generator().manual_seed(7))


@pytest.mark.parametrize("fn, names", [
    (charge_round, None), (run_noise, None), (kept_noise, None), (ledger_entry, None),
    (spent_epsilon, None), (DPPlan.for_data, None),
    (trainer.backward, {"batch_size", "private", "micro_batch", "chunked_loss"}),
    (trainer.train, {"plan", "lr", "sampling", "noise"}),
    (trainer.make_private, {"noise_multiplier", "clip_norm", "expected_batch", "noise"}),
])
def test_privacy_critical_inputs_are_keywords_only(fn, names):
    params = inspect.signature(fn).parameters.values()
    checked = [p for p in params if names is None or p.name in names]
    assert checked and all(p.kind is p.KEYWORD_ONLY for p in checked)


def test_a_plan_is_built_by_name():
    with pytest.raises(TypeError):
        DPPlan(0.1, 3, 4)
