"""What the server prints for a person after each round."""

from __future__ import annotations

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
    return (
        f"round {line['round']}/{num_rounds}  loss {line['eval_loss']:.3f}  "
        f"ppl {line['perplexity']:.1f}  acc {line['token_accuracy']:.3f}  {eps_text}  "
        f"{line['round_seconds']:.1f}s  up {line['bytes_up'] / 1e6:.2f} MB  "
        f"down {line['bytes_down'] / 1e6:.2f} MB{extra}"
    )
