"""User-level (central) DP for the aggregate: DP-FedAvg (McMahan et al., ICLR 2018).

Each client's update (its adapter minus the global one) is clipped to L2 norm S,
the clipped updates are summed, Gaussian noise N(0, (z·S)²) is added to every
coordinate, and the sum is divided by the expected number of clients per round.
One round is one Gaussian mechanism on a sample of clients (rate q = sampled /
total), so the RDP accountant over rounds gives a user-level ε under add/remove-one-
client adjacency: it bounds what the released adapters reveal about *whether a whole
client took part*. `fedslm audit` checks it with Flower's own RdpAccountant too. It needs many
clients to be small: with all clients in every round (q = 1) ε grows quickly.

`CentralDP` wraps a strategy as Flower's DifferentialPrivacyServerSideFixedClipping
does: the wrapped strategy picks the nodes and sends and folds the aggregate into the
global adapter; the wrapper clips, sums and noises the updates. Unlike Flower's, the
noised aggregate is not the inner strategy's weighted mean of clipped updates: it is
the sum over the *expected* number of clients q·N, the mean the accountant's
sensitivity S / (q·N) holds for; and every release is charged to the server's ledger
before it is made.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from contracts.adapter import Arrays
from contracts.rundir import SERVER_CLIENT, server_ledger
from contracts.wire import NUM_EXAMPLES
from privacy.accountant import ADD_REMOVE, epsilon
from privacy.ledger import Entry, Ledger
from server.replies import to_record
from server.strategies import AdapterStrategy
from server.validation import update_norm

log = logging.getLogger("fedslm")


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


class CentralDP(Strategy):
    """DP-FedAvg around `strategy`, its user-level ε charged to the ledger at `ledger`.
    `seed`: noise drawn from (seed, round), so that a resumed run draws the same; None
    draws it from the operating system."""

    def start(self, *args: Any, **kwargs: Any) -> Any:
        """Not used, as for the strategies it wraps (server/strategies.py says why)."""
        raise NotImplementedError("fedslm strategies are run by server.engine.Federation")

    def __init__(self, strategy: AdapterStrategy, *, noise_multiplier: float,
                 clip_norm: float, delta: float, num_clients: int, ledger: Path,
                 run_id: str, seed: int | None = None) -> None:
        self.strategy = strategy
        self.noise_multiplier, self.clip_norm, self.delta = noise_multiplier, clip_norm, delta
        self.num_clients, self.run_id, self.seed = num_clients, run_id, seed
        self.ledger = Ledger(ledger)
        self.epsilon = 0.0

    @classmethod
    def from_config(cls, strategy: AdapterStrategy, config: dict[str, Any],
                    run_dir: Path) -> CentralDP:
        return cls(strategy, noise_multiplier=config["central-noise-multiplier"],
                   clip_norm=config["central-clip-norm"], delta=config["delta"],
                   num_clients=config["num-clients"], ledger=server_ledger(run_dir),
                   run_id=run_dir.name, seed=config["seed"] if config["reproducible"] else None)

    def summary(self) -> None:
        log.info("central DP: noise multiplier %g, clip norm %g", self.noise_multiplier,
                 self.clip_norm)
        self.strategy.summary()

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        return self.strategy.configure_train(server_round, arrays, config, grid)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        return self.strategy.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """The noised mean of the clipped updates, folded into the global adapter by the
        wrapped strategy. With no reply (a Poisson draw of no client) the noise alone is
        still released: skipping it would tell that no client was drawn."""
        updates = self.strategy.updates(replies)
        q = self.strategy.sample_rate
        self.epsilon = self._charge(server_round, q)
        rng = np.random.default_rng(
            [self.seed, server_round] if self.seed is not None else secrets.randbits(128))
        arrays, norms = dp_fedavg(self.strategy.sent(), [u for u, _ in updates], self.clip_norm,
                                  self.noise_multiplier, q * self.num_clients, rng)
        log.info("round %d: central DP, update norms %s, user-level epsilon %.3f",
                 server_round, [round(n, 3) for n in norms], self.epsilon)
        metrics = {NUM_EXAMPLES: float(sum(w for _, w in updates))}
        return to_record(self.strategy.merge(arrays)), MetricRecord(metrics)

    def aggregate_evaluate(self, server_round: int,
                           replies: Iterable[Message]) -> MetricRecord | None:
        return self.strategy.aggregate_evaluate(server_round, replies)

    def expected_update(self, update: Arrays) -> Arrays:
        return self.strategy.expected_update(update)

    def privacy_spent(self) -> float | None:
        """The user-level ε of every release so far."""
        return self.epsilon

    def close(self) -> None:
        self.ledger.close()

    def _charge(self, rnd: int, q: float) -> float:
        """Append this round's release to the ledger (before it is made); its ε."""
        seeded = self.seed is not None  # reproducible: the seed gives the noise away
        history = self.ledger.history() + [(0.0 if seeded else self.noise_multiplier, q, 1)]
        eps = epsilon(history, self.delta, "rdp", ADD_REMOVE)
        self.ledger.append(Entry(
            run_id=self.run_id, round=rnd, client=SERVER_CLIENT, dataset="federation",
            noise_multiplier=self.noise_multiplier, sample_rate=q, steps=1, delta=self.delta,
            accountant="rdp", relation=ADD_REMOVE, epsilon=eps,
            time=time.strftime("%Y-%m-%dT%H:%M:%S%z"), seeded=seeded,
        ))
        return eps
