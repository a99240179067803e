"""LoRA adapters as both sides see them: tensor naming, ranks, and what each strategy
sends. An adapter is a dict of PEFT state-dict keys to float32 arrays; A is r x in,
B is out x r."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

Arrays = dict[str, np.ndarray]
LORA_A = ".lora_A."
LORA = ".lora_"


def is_lora_a(key: str) -> bool:
    return LORA_A in key


def rank_of(arrays: Arrays) -> int:
    """The rank of an adapter (0 when it has no A)."""
    return next((v.shape[0] for k, v in arrays.items() if is_lora_a(k)), 0)


def cut_to_rank(arrays: Arrays, rank: int) -> Arrays:
    """The first `rank` components: rows of each A, columns of each B (HetLoRA's
    truncation); an adapter of smaller rank comes back as it is."""
    return {k: (v[:rank] if is_lora_a(k) else v[:, :rank]) for k, v in arrays.items()}


@dataclass(frozen=True)
class StrategySpec:
    """What a strategy asks of the clients (the server's aggregation is its own)."""

    name: str
    trains_a: bool = True  # False: A stays at the shared seeded start (FFA-LoRA)
    rank_per_client: bool = False  # True: each client trains the rank its device affords


SPECS: dict[str, StrategySpec] = {
    "fedavg": StrategySpec("fedavg"),
    "ffa-lora": StrategySpec("ffa-lora", trains_a=False),
    "hetlora": StrategySpec("hetlora", rank_per_client=True),
}
STRATEGIES = tuple(SPECS)


def spec(strategy: str) -> StrategySpec:
    try:
        return SPECS[strategy]
    except KeyError:
        raise ValueError(f"unknown strategy {strategy!r} (known: {', '.join(SPECS)})") from None


def sent_part(arrays: Arrays, strategy: str) -> Arrays:
    """What travels between server and clients: the whole adapter, or only B when the
    strategy keeps A at its shared start (it is never sent after round 0)."""
    if spec(strategy).trains_a:
        return arrays
    return {k: v for k, v in arrays.items() if not is_lora_a(k)}
