"""The empirical audit of a simulation: plant canaries, train once, score them.

`audit-canaries = m` makes the run plant m secret-sharer canaries ("the secret
number of <name> is <9 random digits>"), each included in client 0's training data
with probability 1/2 (both chosen with OS randomness and kept in
<run>/audit/canaries.json). After the run, every canary is scored by how much the
final global adapter lowered the model's loss on it, and privacy.attacks turns the
scores into AUC, TPR at 1% FPR, exposure and the one-run ε lower bound, written to
<run>/audit/empirical.json, which `fedslm audit` shows beside the accountant's ε.
"""

from __future__ import annotations

import json
import math
import secrets
from pathlib import Path
from typing import Any

import torch

from client import base_model as model_mod
from client import data as data_mod
from client import records
from client.evaluation import per_example_loss
from contracts.environment import default_cache_dir
from contracts.rundir import AUDIT, CANARIES, EMPIRICAL, read_metrics
from contracts.wire import Status
from privacy.attacks import CONFIDENCE, auc, ceiling, exposure, one_run_lower_bound, tpr_at_fpr

NAMES = ("Avery", "Blake", "Casey", "Devon", "Emery", "Finley", "Harper", "Jordan", "Kendall",
         "Logan", "Morgan", "Parker", "Quinn", "Reese", "Rowan", "Sawyer", "Skyler", "Taylor")
DIGITS = 9
ALTERNATIVES = 15  # random secrets each canary is ranked against, for exposure
EXPOSURE_SAMPLE = 40  # planted canaries whose exposure is measured (it costs 16 passes each)
CANARY_PARTITION = 0


def _secret() -> str:
    return "".join(str(secrets.randbelow(10)) for _ in range(DIGITS))


def plant(m: int, run_dir: Path) -> Path:
    canaries = []
    for i in range(m):
        prefix = f"The secret number of {NAMES[i % len(NAMES)]} {i} is "
        canaries.append({"prefix": prefix, "secret": _secret(),
                         "included": bool(secrets.randbelow(2))})
    path = run_dir / AUDIT / CANARIES
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"partition": CANARY_PARTITION, "canaries": canaries}, indent=1))
    return path


def score(run_dir: Path, config: dict[str, Any]) -> dict[str, Any]:
    planted = json.loads((run_dir / AUDIT / CANARIES).read_text())["canaries"]
    source = model_mod.prepare_base(config["model"], Path(config["cache-dir"] or
                                                           default_cache_dir()))
    device = torch.device("cpu")
    quant = model_mod.Quantization("none", str(model_mod.compute_dtype(device))[6:], "audit")
    base, tokenizer = model_mod.load_base(source, quant, device)
    texts = [c["prefix"] + c["secret"] for c in planted]
    before = per_example_loss(base, _encode(texts, tokenizer))

    from peft import PeftModel

    tuned = PeftModel.from_pretrained(base, run_dir / "adapter")
    after = per_example_loss(tuned, _encode(texts, tokenizer))
    scores = [float(b - a) for b, a in zip(before, after, strict=True)]
    members = [c["included"] for c in planted]
    ranks = []
    sample = [(c, loss) for c, loss in zip(planted, after, strict=True) if c["included"]]
    for c, loss in sample[:EXPOSURE_SAMPLE]:
        others = [c["prefix"] + _secret() for _ in range(ALTERNATIVES)]
        other_losses = per_example_loss(tuned, _encode(others, tokenizer))
        ranks.append(1 + int((other_losses < loss).sum()))
    bound, guesses, correct = one_run_lower_bound(scores, members, delta=config["delta"])
    result = {
        "canaries": len(planted),
        "included": sum(members),
        "client_partition": CANARY_PARTITION,
        "auc": auc(scores, members),
        "tpr_at_1pct_fpr": tpr_at_fpr(scores, members, 0.01),
        "exposure_mean": sum(exposure(r, ALTERNATIVES + 1) for r in ranks) / max(len(ranks), 1),
        "exposure_max_possible": math.log2(ALTERNATIVES + 1),
        "guesses": guesses,
        "correct_guesses": correct,
        "epsilon_lower_bound": bound,
        "epsilon_ceiling": ceiling(len(planted), CONFIDENCE, config["delta"]),
        "confidence": CONFIDENCE,
        "delta": config["delta"],
        "epsilon_accountant": _accountant_epsilon(run_dir, config),
        "dp": config["dp"],
    }
    (run_dir / AUDIT / EMPIRICAL).write_text(json.dumps(result, indent=2))
    return result


def _encode(texts: list[str], tokenizer) -> data_mod.Examples:
    """Canaries padded to the longest one only: scoring costs what the canaries need."""
    longest = max(len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts)
    part = data_mod.Partition("canaries", tuple(records.Text(t) for t in texts),
                              records=True)
    return data_mod.encode_all(part, tokenizer, longest)


def _accountant_epsilon(run_dir: Path, config: dict[str, Any]) -> float | None:
    name = data_mod.partition(config["data"], CANARY_PARTITION).client
    for line in reversed(read_metrics(run_dir)):
        for row in line["clients"]:
            if row["client"] == name and row.get("status") == Status.TRAINED:
                return row["epsilon"]  # None: trained without DP, ε = ∞
    return None
