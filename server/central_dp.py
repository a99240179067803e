"""User-level (central) DP for the aggregate: DP-FedAvg (McMahan et al., ICLR 2018).

Each client's update (its adapter minus the global one) is clipped to L2 norm S,
the clipped updates are summed, Gaussian noise N(0, (z·S)²) is added to every
coordinate, and the sum is divided by the expected number of clients per round.
One round is one Gaussian mechanism on a sample of clients (rate q = sampled /
total), so the RDP accountant over rounds gives a user-level ε: it bounds what the
released adapters reveal about *whether a whole client took part*. It needs many
clients to be small: with all clients in every round (q = 1) ε grows quickly.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from server.strategies import Arrays, update_norm


def dp_fedavg(reference: Arrays, updates: Sequence[Arrays], clip_norm: float,
              noise_multiplier: float, expected_clients: float,
              rng: np.random.Generator) -> tuple[Arrays, list[float]]:
    """The noised mean of clipped updates, applied to `reference`; and each update's norm."""
    total = {k: np.zeros_like(v, dtype=np.float64) for k, v in reference.items()}
    norms = []
    for update in updates:
        norm = update_norm(update, reference)
        scale = min(1.0, clip_norm / (norm + 1e-12))
        for k in total:
            total[k] += (update[k] - reference[k]) * scale
        norms.append(norm)
    std = noise_multiplier * clip_norm
    return {
        k: (reference[k] + (total[k] + rng.normal(0.0, std, size=total[k].shape))
            / expected_clients).astype(np.float32)
        for k in total
    }, norms
