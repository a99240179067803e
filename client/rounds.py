"""One client's work in a round, free of Flower: train under DP, or evaluate.

The model and data come from the process cache (client/cache.py); the round's DP plan
is charged to the ledger (client/charge.py) before the trainer runs it.
"""

from __future__ import annotations

import logging
import random
import secrets
import time
import zlib

import torch
from flwr.app import MessageType

from client import adapter as adapter_mod
from client import tasks
from client.cache import Session
from client.charge import charge_round, spent_epsilon
from client.dp_plan import DPPlan
from client.energy import peak_rss_mb
from client.evaluation import evaluate
from client.progress import RoundProgress
from client.settings import ClientSettings, micro_batch
from client.trainer import TrainResult, train
from contracts import codec
from contracts import wire as w
from contracts.adapter import Arrays, cut_to_rank, sent_part
from contracts.rundir import ledger_path
from privacy.budget import RoundPlan

log = logging.getLogger("fedslm")
Reply = tuple[Arrays, dict[str, float], dict[str, str]]  # (arrays, metrics, info)


OK, DROPOUT = "ok", "dropout"  # run_round's outcomes


def run_round(kind: str, s: ClientSettings, arrays: Arrays) -> tuple[str, object]:
    """A train or evaluate round in this process: ("ok", (arrays, metrics, info)) or
    ("dropout", reason) for a simulated dropout. The ClientApp (client/app.py) and a
    device's process (client/device.py) both come here; errors are raised."""
    if kind == MessageType.EVALUATE:
        return OK, evaluate_round(s, dict(arrays))
    if simulated_dropout(s):  # an error reply, as from a device that failed
        return DROPOUT, f"simulated dropout (dropout-rate={s.dropout_rate:g})"
    return OK, train_round(s, dict(arrays))


def simulated_dropout(s: ClientSettings) -> bool:
    """Whether this client fails this round (`dropout-rate`, for simulating unreliable
    devices); decided before any training, so a dropped round spends no privacy."""
    if s.dropout_rate <= 0:
        return False
    rng = random.Random(f"{s.seed}|{s.partition}|{s.round}") if s.reproducible \
        else random.SystemRandom()
    return rng.random() < s.dropout_rate


def train_round(s: ClientSettings, arrays: Arrays) -> Reply:
    """Check the budget, charge the ledger, train; return (adapter arrays, metrics, info).

    A round the budget does not allow returns no arrays and says why in info["status"].
    """
    session = Session.get(s)
    _load_global(session, arrays, s)  # an adapter that does not fit fails before any charge
    verdict, plan, ledger_id = charge_round(s=s, client=session.client,
                                            num_examples=len(session.train),
                                            dataset=session.train.fingerprint())
    if verdict.refused:
        log.warning("client %s round %d: not training: %s", session.client, s.round,
                    verdict.refused)
        return {}, _budget_metrics(s, verdict), _info(session, "", ledger_id, verdict.refused)
    with session.energy_meter() as meter:
        result = _train(session, s, plan, verdict)
    # The training loss, the Poisson batch sizes and the timings are functions of the
    # private data that DP does not cover: they stay in the client's log, and reach the
    # server only if the data owner set release-stats (contracts/wire.py RELEASES).
    log.info("client %s round %d: %d steps (%d empty), loss %.3f, sigma %.3f, epsilon %.3f, "
             "%.1fs, %.0f J (%s)", session.client, s.round, result.steps, result.empty_steps,
             result.mean_loss, plan.noise_multiplier, verdict.epsilon_after, result.seconds,
             meter.reading.joules, meter.reading.method)
    metrics = w.released({
        **_budget_metrics(s, verdict),
        w.NUM_EXAMPLES: len(session.train),
        w.NOISE_MULTIPLIER: plan.noise_multiplier,
        w.CLIP_NORM: plan.clip_norm if plan.private else -1.0,
        w.SAMPLE_RATE: plan.sample_rate,
        w.STEPS: plan.steps,  # trainer.train checked that it ran exactly these
        w.TRAIN_SECONDS: result.seconds,
        w.CPU_SECONDS: meter.reading.cpu_seconds,
        w.ENERGY_J: meter.reading.joules,
        w.PEAK_RSS_MB: peak_rss_mb(),
    }, s.release_stats)
    return (_encoded_update(session, s, arrays), metrics,
            _info(session, meter.reading.method, ledger_id))


def _train(session: Session, s: ClientSettings, plan: DPPlan, verdict: RoundPlan) -> TrainResult:
    sampling, noise = generators(s, session.client, next(session.model.parameters()).device)
    every = max(1, plan.steps // 4)
    shown = RoundProgress(state_dir=s.resolved_state_dir(session.client), run_id=s.run_id,
                          client=session.client, round=s.round, planned=plan.steps,
                          every=s.progress_seconds)

    def progress(step: int, loss: float) -> None:
        shown.step(step)
        if step % every == 0 or step == plan.steps:
            log.info("client %s round %d: step %d/%d, loss %.3f, epsilon after round %.3f",
                     session.client, s.round, step, plan.steps, loss, verdict.epsilon_after)

    return train(session.model, session.train, plan=plan, lr=s.lr, sampling=sampling,
                 noise=noise, optimizer_name=s.optimizer, progress=progress,
                 micro_batch=micro_batch(s.micro_batch_tokens, s.seq_len,
                                         session.quantization.dtype))


def generators(s: ClientSettings, client: str,
               device: torch.device) -> tuple[torch.Generator, torch.Generator]:
    """(sampling, noise) randomness: secret unless the run asked to be reproducible.
    Poisson sampling draws on the CPU; Opacus draws the noise where the parameters are,
    so its generator must live on the model's device (a CPU one fails on CUDA; the same
    seed gives other draws there)."""
    if s.reproducible:  # the same seed gives the same draws in any run (and a resumed one)
        base = zlib.crc32(f"{s.seed}|{client}|{s.round}".encode())
        seeds = (base, base + 1)
    else:
        seeds = (secrets.randbits(63), secrets.randbits(63))
    return (torch.Generator().manual_seed(seeds[0]),
            torch.Generator(device=device).manual_seed(seeds[1]))


def _load_global(session: Session, arrays: Arrays, s: ClientSettings) -> None:
    adapter_mod.load_global(session.model, arrays, strategy=s.strategy, rank=s.lora_r,
                            seed=s.seed)


def _encoded_update(session: Session, s: ClientSettings, received: Arrays) -> Arrays:
    """The update on the wire (contracts/codec.py): a change from what was received."""
    sent = sent_part(adapter_mod.get_adapter(session.model), s.strategy)
    reference = cut_to_rank(received, s.lora_r)
    if not set(sent) <= set(reference):
        return sent
    values, scales = codec.encode(sent, {k: reference[k] for k in sent}, s.update_encoding)
    return codec.pack(values, scales)


def _budget_metrics(s: ClientSettings, verdict: RoundPlan) -> dict[str, float]:
    spent = verdict.epsilon_before if verdict.refused else verdict.epsilon_after
    return {
        w.NUM_EXAMPLES: 0,
        w.EPSILON: w.epsilon_to_wire(spent),
        w.DELTA: s.delta,
        w.BUDGET_EPSILON: s.budget_epsilon or 0.0,
        w.BUDGET_DELTA: s.budget_delta or 0.0,
    }


def evaluate_round(s: ClientSettings, arrays: Arrays) -> tuple[Arrays, dict, dict]:
    """Held-out metrics of the given adapter; given none (round 0), the seeded initial
    adapter is evaluated and returned, so that the server learns the shared start."""
    session = Session.get(s)
    _load_global(session, arrays, s)
    initial = {} if arrays else adapter_mod.get_adapter(session.model)
    started = time.perf_counter()
    with session.energy_meter() as meter:
        sums = evaluate(session.model, session.heldout)
        task = tasks.evaluate(session.model, session.tokenizer, session.task,
                              s.task_max_new_tokens) if session.task else None
    seconds = time.perf_counter() - started
    eps, ledger_id = spent_epsilon(path=ledger_path(s.resolved_state_dir(session.client)),
                                   delta=s.delta)
    kept = "" if s.release_stats else " (kept on this device: release-stats is false)"
    log.info("client %s round %d: held-out loss %.4f over %d tokens%s, %.1fs%s",
             session.client, s.round, sums.loss_sum / max(sums.tokens, 1), sums.tokens,
             _task_text(task), seconds, kept)
    metrics = w.released({
        w.NUM_EXAMPLES: len(session.heldout),
        w.EVAL_LOSS_SUM: sums.loss_sum,
        w.EVAL_TOKENS: sums.tokens,
        w.EVAL_CORRECT: sums.correct,
        w.EVAL_SECONDS: seconds,
        w.EPSILON: w.epsilon_to_wire(eps),
        w.DELTA: s.delta,
        w.ENERGY_J: meter.reading.joules,
        w.PEAK_RSS_MB: peak_rss_mb(),
        **(task.metrics() if task else {}),
    }, s.release_stats)
    return initial, metrics, _info(session, meter.reading.method, ledger_id)


def _task_text(task: tasks.TaskSums | None) -> str:
    if task is None:
        return ""
    text = ""
    if task.choice_items:
        text += (f", task accuracy {task.choice_correct / task.choice_items:.3f} "
                 f"(normalised {task.choice_correct_norm / task.choice_items:.3f}) "
                 f"of {task.choice_items} items")
    if task.answer_items:
        text += (f", exact match {task.exact / task.answer_items:.3f}, F1 "
                 f"{task.f1_sum / task.answer_items:.3f} of {task.answer_items} answers")
    return text


def _info(session: Session, energy_method: str, ledger_id: str,
          refused: str = "") -> dict[str, str]:
    status = w.status_text(w.Status.REFUSED, refused) if refused else w.Status.OK.value
    return {
        w.CLIENT: session.client,
        w.STATUS: status,
        w.ENERGY_METHOD: energy_method,
        w.QUANTIZATION: session.quantization.mode,
        w.QUANTIZATION_REASON: session.quantization.reason,
        w.COMPUTE_DTYPE: session.quantization.dtype,
        w.ADAPTER_CONFIG: session.adapter_config,
        w.LEDGER_ID: ledger_id,
    }

