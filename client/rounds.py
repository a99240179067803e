"""One client's work in a round, free of Flower: train under DP, or evaluate.

A process keeps its loaded base model, adapter and tokenised data between
rounds (`Session`), since Flower calls the ClientApp afresh each round. What
must outlive the process (the privacy ledger) lives in the client's state folder.
"""

from __future__ import annotations

import logging
import math
import secrets
import zlib
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch

from client import data as data_mod
from client import model as model_mod
from client.energy import CpuTimeEnergy, peak_rss_mb
from client.evaluation import evaluate
from client.settings import ClientSettings
from client.trainer import DPSettings, sample_rate, train
from privacy.accountant import epsilon, noise_for_target
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

    _current = None  # one per process: a client process serves one partition at a time

    @classmethod
    def get(cls, s: ClientSettings) -> Session:
        key = (s.model, s.quantization, s.device, s.lora_r, s.lora_alpha, s.lora_dropout,
               s.lora_targets, s.seed, s.data, s.partition, s.seq_len, s.max_eval_seqs)
        if cls._current is not None and cls._current.key == key:
            return cls._current
        cls._current = None  # free the old model before loading the next
        if s.threads > 0:
            torch.set_num_threads(s.threads)
        cache = Path(s.cache_dir) if s.cache_dir else None
        source = model_mod.prepare_base(s.model, cache)
        device = model_mod.pick_device(s.device)
        params = model_mod.count_params(source)
        quant = model_mod.choose_quantization(s.quantization, device, params)
        base, tokenizer = model_mod.load_base(source, quant, device)
        model = model_mod.attach_lora(
            base, s.lora_r, s.lora_alpha, s.lora_dropout, list(s.lora_targets), s.seed
        )
        part = data_mod.partition(s.data, s.partition)
        train_set, heldout = data_mod.encode(part, tokenizer, s.seq_len, s.max_eval_seqs)
        name = s.client or part.client
        base_name = s.model if s.model != model_mod.EMBEDDED else source
        cls._current = cls(key, model, tokenizer, quant, source, name, train_set, heldout,
                           model_mod.adapter_config_json(model, base_name))
        log.info("client %s: %d train / %d held-out sequences, quantization %s (%s)",
                 name, len(train_set), len(heldout), quant.mode, quant.reason)
        return cls._current

    def load_global(self, arrays: dict[str, np.ndarray], seed: int) -> None:
        """The server's adapter, or (first round) the shared seeded initial one."""
        if arrays:
            model_mod.set_adapter(self.model, arrays)
        else:
            model_mod.reset_adapter(self.model, seed)


def _generators(s: ClientSettings, client: str) -> tuple[torch.Generator, torch.Generator]:
    """Sampling and noise randomness: secret unless the run asked to be reproducible."""
    if s.reproducible:
        base = zlib.crc32(f"{s.seed}|{client}|{s.run_id}|{s.round}".encode())
        seeds = (base, base + 1)
    else:
        seeds = (secrets.randbits(63), secrets.randbits(63))
    return tuple(torch.Generator().manual_seed(x) for x in seeds)  # type: ignore[return-value]


def planned_noise(s: ClientSettings, q: float) -> float:
    """σ from config, or the one that makes all planned rounds land on the target ε."""
    if s.noise_multiplier is not None:
        return s.noise_multiplier
    return noise_for_target(s.target_epsilon, s.delta, q, s.num_rounds * s.local_steps)


def train_round(s: ClientSettings, arrays: dict[str, np.ndarray]) -> tuple[dict, dict, dict]:
    """Charge the ledger, train, and return (adapter arrays, metrics, info)."""
    session = Session.get(s)
    session.load_global(arrays, s.seed)
    q = sample_rate(len(session.train), s.batch_size)
    sigma = planned_noise(s, q) if s.dp else 0.0
    dp = DPSettings(sigma, s.clip_norm) if s.dp else None
    state = s.resolved_state_dir(session.client)
    with Ledger(state / LEDGER_FILE) as ledger:
        history = ledger.history() + [(sigma, q, s.local_steps)]
        eps = epsilon(history, s.delta, ACCOUNTANT)
        # Charged before training: a crash after this line still counts as spent.
        ledger.append(Entry(
            run_id=s.run_id, round=s.round, client=session.client,
            dataset=session.train.fingerprint(), noise_multiplier=sigma, sample_rate=q,
            steps=s.local_steps, delta=s.delta, accountant=ACCOUNTANT, epsilon=eps,
            time=datetime.now(UTC).isoformat(timespec="seconds"),
        ))
    sampling, noise = _generators(s, session.client)
    with CpuTimeEnergy() as meter:
        result = train(session.model, session.train, s.local_steps, s.batch_size, s.lr, dp,
                       sampling, noise, s.optimizer)
    out = model_mod.get_adapter(session.model)
    log.info("client %s round %d: %d steps, loss %.3f, sigma %.3f, epsilon %.3f, %.1fs",
             session.client, s.round, result.steps, result.mean_loss, sigma, eps, result.seconds)
    metrics = {
        "num-examples": len(session.train),
        "epsilon": eps if math.isfinite(eps) else -1.0,
        "delta": s.delta,
        "noise-multiplier": sigma,
        "clip-norm": s.clip_norm if s.dp else -1.0,
        "sample-rate": q,
        "steps": result.steps,
        "examples-seen": result.examples_seen,
        "empty-steps": result.empty_steps,
        "train-loss": result.mean_loss,
        "train-seconds": result.seconds,
        "cpu-seconds": meter.reading.cpu_seconds,
        "energy-j": meter.reading.joules,
        "peak-rss-mb": peak_rss_mb(),
    }
    return out, metrics, _info(session, meter.reading.method)


def evaluate_round(s: ClientSettings, arrays: dict[str, np.ndarray]) -> tuple[dict, dict]:
    session = Session.get(s)
    session.load_global(arrays, s.seed)
    with CpuTimeEnergy() as meter:
        sums = evaluate(session.model, session.heldout)
    eps = spent_epsilon(s.resolved_state_dir(session.client) / LEDGER_FILE, s.delta)
    metrics = {
        "num-examples": len(session.heldout),
        "eval-loss-sum": sums.loss_sum,
        "eval-tokens": sums.tokens,
        "eval-correct": sums.correct,
        "epsilon": eps if math.isfinite(eps) else -1.0,
        "delta": s.delta,
        "energy-j": meter.reading.joules,
        "peak-rss-mb": peak_rss_mb(),
    }
    return metrics, _info(session, meter.reading.method)


def spent_epsilon(ledger_path: Path, delta: float) -> float:
    """The cumulative ε recorded in a client's ledger (0 when it has none)."""
    if not ledger_path.is_file():
        return 0.0
    with Ledger(ledger_path, create=False) as ledger:
        return epsilon(ledger.history(), delta, ACCOUNTANT)


def _info(session: Session, energy_method: str) -> dict[str, str]:
    return {
        "client": session.client,
        "energy-method": energy_method,
        "quantization": session.quantization.mode,
        "quantization-reason": session.quantization.reason,
        "compute-dtype": session.quantization.dtype,
        "adapter-config": session.adapter_config,
    }
