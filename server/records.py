"""What the server prints for a person after each round."""

from __future__ import annotations

import math
from typing import Any

from contracts.wire import format_epsilon


def summary_line(line: dict[str, Any], num_rounds: int) -> str:
    eps = line.get("epsilon")
    eps_text = f"no DP (ε = {format_epsilon(eps)})" if format_epsilon(eps) == "∞" \
        else f"ε {eps:.2f} (δ={line['delta']:g})"
    if line.get("central_epsilon"):
        eps_text += f"  user-level ε {line['central_epsilon']:.2f}"
    extra = "".join(f"  {key}: {len(line[key])}" for key in ("dropouts", "failures")
                    if line.get(key))
    if line.get("skipped"):
        extra += "  (training skipped: too few updates)"
    if line.get("privacy_flags"):
        extra += f"  PRIVACY FLAGS: {len(line['privacy_flags'])} (see the log, fedslm audit)"
    loss = line.get("eval_loss")
    held_out = "held-out metrics kept on the devices" if loss is None or math.isnan(loss) \
        else (f"loss {loss:.3f}  ppl {line['perplexity']:.1f}  "
              f"acc {line['token_accuracy']:.3f}")
    held_out += task_text(line)
    return (
        f"round {line['round']}/{num_rounds}  {held_out}  {eps_text}  "
        f"{line['round_seconds']:.1f}s  up {line['bytes_up'] / 1e6:.2f} MB  "
        f"down {line['bytes_down'] / 1e6:.2f} MB{extra}"
    )


def task_text(line: dict[str, Any]) -> str:
    """The task's figures of a round line ("" without a task)."""
    text = ""
    if line.get("task_items"):
        text += (f"  task acc {line['task_accuracy']:.3f} (norm "
                 f"{line['task_accuracy_norm']:.3f}, {line['task_items']} items)")
    if line.get("task_answers"):
        text += (f"  task EM {line['task_exact_match']:.3f} F1 {line['task_f1']:.3f} "
                 f"({line['task_answers']} answers)")
    return text
