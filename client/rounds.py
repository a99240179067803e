"""One client's work in a round, free of Flower: train under DP, or evaluate.

A process keeps its loaded base model, adapter and tokenised data between
rounds (`Session`), since Flower calls the ClientApp afresh each round. What
must outlive the process (the privacy ledger) lives in the client's state folder.
"""

from __future__ import annotations

import gc
import logging
import math
import random
import secrets
import time
import zlib
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch

from client import codec
from client import data as data_mod
from client import model as model_mod
from client.energy import EnergyMeter, peak_rss_mb
from client.evaluation import evaluate
from client.profiles import DeviceProfile, profile
from client.settings import ClientSettings
from client.trainer import DPSettings, sample_rate, train
from privacy.accountant import epsilon
from privacy.budget import Budget, RoundPlan, plan_round
from privacy.ledger import Entry, Ledger

log = logging.getLogger("fedslm")
LEDGER_FILE = "ledger.sqlite"
ACCOUNTANT = "rdp"


@dataclass
class Session:
    key: tuple
    model: object  # a PeftModel
    tokenizer: object
    quantization: model_mod.Quantization
    source: str
    client: str
    train: data_mod.Examples
    heldout: data_mod.Examples
    adapter_config: str
    profile: DeviceProfile
    on_gpu: bool

    # One model per process, shared by the clients it serves in turn (a simulation's
    # actor): load_global overwrites the whole adapter before every use. Tokenised data
    # is kept per client (small), so that switching clients costs neither a model load
    # nor a re-tokenisation.
    _current: ClassVar[Session | None] = None
    _model: ClassVar[tuple | None] = None  # (key, (model, tokenizer, quantization, source))
    _data: ClassVar[dict] = {}  # data key -> (client name, train, held-out)
    MAX_CLIENTS_CACHED: ClassVar[int] = 64

    @classmethod
    def forget(cls) -> None:
        """Drop everything this process holds, as a fresh process would start."""
        cls._current, cls._model, cls._data = None, None, {}

    @classmethod
    def get(cls, s: ClientSettings) -> Session:
        device_profile = profile(s.device_profile)
        threads = s.threads or device_profile.threads
        model_key = (s.model, s.quantization, s.device, s.lora_r, s.lora_alpha, s.lora_dropout,
                     s.lora_targets, s.seed, threads, s.strategy)
        data_key = (s.data, s.partition, s.seq_len, s.max_eval_seqs, s.canary_file, s.client)
        key = (model_key, data_key, s.device_profile)
        if cls._current is not None and cls._current.key == key:
            return cls._current
        cls._current = None
        if cls._model is None or cls._model[0] != model_key:
            cls._model, cls._data = None, {}  # free the old model (and its tokenisation)
            gc.collect()
            if threads:
                torch.set_num_threads(threads)
            cls._model = (model_key, _load_model(s))
        model, tokenizer, quant, source = cls._model[1]
        device = next(model.parameters()).device
        if data_key not in cls._data:
            if len(cls._data) >= cls.MAX_CLIENTS_CACHED:
                cls._data.pop(next(iter(cls._data)))
            name, train_set, heldout = _load_data(s, tokenizer)
            cls._data[data_key] = (name, train_set.to(device), heldout.to(device))
            log.info("client %s: %d train / %d held-out sequences, quantization %s (%s)",
                     name, len(train_set), len(heldout), quant.mode, quant.reason)
        name, train_set, heldout = cls._data[data_key]
        base_name = s.model if s.model != model_mod.EMBEDDED else source
        cls._current = cls(key, model, tokenizer, quant, source, name, train_set, heldout,
                           model_mod.adapter_config_json(model, base_name), device_profile,
                           device.type == "cuda")
        return cls._current

    def energy_meter(self) -> EnergyMeter:
        return EnergyMeter(self.profile.watts_per_core, gpu=self.on_gpu)

    def load_global(self, arrays: dict[str, np.ndarray], s: ClientSettings) -> None:
        """The server's adapter, or (first round) the shared seeded initial one. Under
        FFA-LoRA the server sends only B (A is the seeded start); under HetLoRA a larger
        global adapter is cut to this client's rank."""
        if not arrays or s.strategy == "ffa-lora":
            model_mod.reset_adapter(self.model, s.seed)
        if arrays:
            if s.strategy == "ffa-lora":
                arrays = {**model_mod.get_adapter(self.model), **arrays}
            model_mod.set_adapter(self.model, model_mod.fit_rank(arrays, s.lora_r))

    def sent_part(self, s: ClientSettings) -> dict[str, np.ndarray]:
        """What this client sends: its adapter, without A under FFA-LoRA."""
        arrays = model_mod.get_adapter(self.model)
        if s.strategy == "ffa-lora":
            arrays = {k: v for k, v in arrays.items() if ".lora_A." not in k}
        return arrays

    def encoded_update(self, s: ClientSettings, received: dict[str, np.ndarray]) -> dict:
        """The update on the wire (client/codec.py): a change from what was received."""
        sent = self.sent_part(s)
        reference = model_mod.fit_rank(received, s.lora_r)
        if not set(sent) <= set(reference):
            return sent
        values, scales = codec.encode(sent, {k: reference[k] for k in sent}, s.update_encoding)
        return codec.pack(values, scales)


def _load_model(s: ClientSettings):
    """The base model with a LoRA adapter, its tokenizer, the quantization used, its source."""
    source = model_mod.prepare_base(s.model, Path(s.cache_dir) if s.cache_dir else None)
    device = model_mod.pick_device(s.device)
    quant = model_mod.choose_quantization(s.quantization, device, model_mod.count_params(source))
    base, tokenizer = model_mod.load_base(source, quant, device)
    model = model_mod.attach_lora(base, s.lora_r, s.lora_alpha, s.lora_dropout,
                                  list(s.lora_targets), s.seed)
    if s.strategy == "ffa-lora":
        model_mod.freeze_lora_a(model)
    return model, tokenizer, quant, source


def _load_data(s: ClientSettings, tokenizer) -> tuple[str, data_mod.Examples, data_mod.Examples]:
    """This client's name and its (train, held-out) examples."""
    part = data_mod.partition(s.data, s.partition)
    train_set, heldout = data_mod.encode(part, tokenizer, s.seq_len, s.max_eval_seqs)
    if s.canary_file:  # an empirical privacy audit (simulations/canaries.py)
        canaries = data_mod.planted_canaries(s.canary_file, s.partition, tokenizer, s.seq_len)
        if canaries is not None:
            train_set = data_mod.concat(train_set, canaries)
    return s.client or part.client, train_set, heldout


def _generators(s: ClientSettings, client: str) -> tuple[torch.Generator, torch.Generator]:
    """Sampling and noise randomness: secret unless the run asked to be reproducible."""
    if s.reproducible:  # the same seed gives the same draws in any run (and a resumed one)
        base = zlib.crc32(f"{s.seed}|{client}|{s.round}".encode())
        seeds = (base, base + 1)
    else:
        seeds = (secrets.randbits(63), secrets.randbits(63))
    return tuple(torch.Generator().manual_seed(x) for x in seeds)  # type: ignore[return-value]


def simulated_dropout(s: ClientSettings) -> bool:
    """Whether this client fails this round (`dropout-rate`, for simulating unreliable
    devices); decided before any training, so a dropped round spends no privacy."""
    if s.dropout_rate <= 0:
        return False
    rng = random.Random(f"{s.seed}|{s.partition}|{s.round}") if s.reproducible \
        else random.SystemRandom()
    return rng.random() < s.dropout_rate


def train_round(s: ClientSettings, arrays: dict[str, np.ndarray]) -> tuple[dict, dict, dict]:
    """Check the budget, charge the ledger, train; return (adapter arrays, metrics, info).

    A round the budget does not allow returns no arrays and says why in info["status"].
    """
    session = Session.get(s)
    q = sample_rate(len(session.train), s.batch_size)
    plan = _charge(s, session, q)
    if plan.refused:
        log.warning("client %s round %d: not training: %s", session.client, s.round,
                    plan.refused)
        return {}, _budget_metrics(s, plan), _info(session, "", plan.refused)
    session.load_global(arrays, s)
    dp = DPSettings(plan.noise_multiplier, s.clip_norm) if s.dp else None
    sampling, noise = _generators(s, session.client)
    every = max(1, s.local_steps // 4)

    def progress(step: int, loss: float) -> None:
        if step % every == 0 or step == s.local_steps:
            log.info("client %s round %d: step %d/%d, loss %.3f, epsilon after round %.3f",
                     session.client, s.round, step, s.local_steps, loss, plan.epsilon_after)

    with session.energy_meter() as meter:
        result = train(session.model, session.train, s.local_steps, s.batch_size, s.lr, dp,
                       sampling, noise, s.optimizer, progress, micro_batch=s.micro_batch)
    # The training loss and the Poisson batch sizes are functions of the private data
    # that DP does not cover: they stay in the client's log and never reach the server.
    log.info("client %s round %d: %d steps (%d empty), loss %.3f, sigma %.3f, epsilon %.3f, "
             "%.1fs", session.client, s.round, result.steps, result.empty_steps,
             result.mean_loss, plan.noise_multiplier, plan.epsilon_after, result.seconds)
    metrics = {
        **_budget_metrics(s, plan),
        "num-examples": len(session.train),
        "noise-multiplier": plan.noise_multiplier,
        "clip-norm": s.clip_norm if s.dp else -1.0,
        "sample-rate": q,
        "steps": result.steps,
        "train-seconds": result.seconds,
        "cpu-seconds": meter.reading.cpu_seconds,
        "energy-j": meter.reading.joules,
        "peak-rss-mb": peak_rss_mb(),
    }
    return session.encoded_update(s, arrays), metrics, _info(session, meter.reading.method)


def _charge(s: ClientSettings, session: Session, q: float) -> RoundPlan:
    """Plan the round against the ledger and the budget; if it may run, record its spend
    now, before training: a crash after this still counts as spent."""
    with Ledger(s.resolved_state_dir(session.client) / LEDGER_FILE) as ledger:
        entries = ledger.entries()
        plan = plan_round(
            earlier_runs=[e.mechanism for e in entries if e.run_id != s.run_id],
            this_run=[e.mechanism for e in entries if e.run_id == s.run_id],
            sample_rate=q, steps=s.local_steps, planned_steps=s.num_rounds * s.local_steps,
            delta=s.delta, target_epsilon=s.target_epsilon,
            budget=Budget(s.budget_epsilon, s.budget_delta),
            noise_multiplier=s.noise_multiplier, private=s.dp,
        )
        if not plan.refused:
            ledger.append(Entry(
                run_id=s.run_id, round=s.round, client=session.client,
                dataset=session.train.fingerprint(), noise_multiplier=plan.noise_multiplier,
                sample_rate=q, steps=s.local_steps, delta=s.delta, accountant=ACCOUNTANT,
                epsilon=plan.epsilon_after,
                time=datetime.now(UTC).isoformat(timespec="seconds"),
                budget_epsilon=s.budget_epsilon, budget_delta=s.budget_delta,
            ))
    return plan


def _finite_or_flag(value: float) -> float:
    return value if math.isfinite(value) else -1.0  # MetricRecord and JSON hold no inf


def _budget_metrics(s: ClientSettings, plan: RoundPlan) -> dict[str, float]:
    spent = plan.epsilon_before if plan.refused else plan.epsilon_after
    return {
        "num-examples": 0,
        "epsilon": _finite_or_flag(spent),
        "delta": s.delta,
        "budget-epsilon": s.budget_epsilon or 0.0,
        "budget-delta": s.budget_delta or 0.0,
    }


def evaluate_round(s: ClientSettings, arrays: dict[str, np.ndarray]) -> tuple[dict, dict, dict]:
    """Held-out metrics of the given adapter; given none (round 0), the seeded initial
    adapter is evaluated and returned, so that the server learns the shared start."""
    session = Session.get(s)
    session.load_global(arrays, s)
    initial = {} if arrays else model_mod.get_adapter(session.model)
    started = time.perf_counter()
    with session.energy_meter() as meter:
        sums = evaluate(session.model, session.heldout)
    seconds = time.perf_counter() - started
    eps = spent_epsilon(s.resolved_state_dir(session.client) / LEDGER_FILE, s.delta)
    metrics = {
        "num-examples": len(session.heldout),
        "eval-loss-sum": sums.loss_sum,
        "eval-tokens": sums.tokens,
        "eval-correct": sums.correct,
        "eval-seconds": seconds,
        "epsilon": _finite_or_flag(eps),
        "delta": s.delta,
        "energy-j": meter.reading.joules,
        "peak-rss-mb": peak_rss_mb(),
    }
    return initial, metrics, _info(session, meter.reading.method)


def spent_epsilon(ledger_path: Path, delta: float) -> float:
    """The cumulative ε recorded in a client's ledger (0 when it has none)."""
    if not ledger_path.is_file():
        return 0.0
    with Ledger(ledger_path, create=False) as ledger:
        return epsilon(ledger.history(), delta, ACCOUNTANT)


def _info(session: Session, energy_method: str, refused: str = "") -> dict[str, str]:
    return {
        "client": session.client,
        "status": f"refused: {refused}" if refused else "ok",
        "energy-method": energy_method,
        "quantization": session.quantization.mode,
        "quantization-reason": session.quantization.reason,
        "compute-dtype": session.quantization.dtype,
        "adapter-config": session.adapter_config,
    }
