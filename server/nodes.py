"""Which nodes take part in a round: waiting for them, and sampling the trainers."""

from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass
from typing import Any

from flwr.serverapp import Grid

from server.errors import FederationError

log = logging.getLogger("fedslm")


def wait_for_nodes(grid: Grid, count: int, timeout: float) -> list[int]:
    """The connected nodes, sorted, once at least `count` are there."""
    deadline = time.monotonic() + timeout
    while True:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= count:
            return nodes
        if time.monotonic() > deadline:
            raise FederationError(f"only {len(nodes)} of {count} clients connected in {timeout:g}s")
        time.sleep(1.0)


def sample_clients(nodes: list[int], want: int, total: int, poisson: bool,
                   rng: random.Random) -> tuple[list[int], float]:
    """A round's trainers and the rate q they were sampled at. `want` = 0 asks every
    node (q = 1: no sampling to amplify privacy, even when some nodes are gone). Poisson
    sampling (each node with probability q = want / total, what the central-DP
    accountant models) when `poisson`; otherwise a uniform sample of `want`."""
    if not want or (want >= len(nodes) and not poisson):
        return nodes, 1.0
    if poisson:
        q = min(1.0, want / total)
        return [n for n in nodes if rng.random() < q], q
    return sorted(rng.sample(nodes, want)), want / total


@dataclass(frozen=True)
class Sampling:
    """The config keys of node selection."""

    num_clients: int
    min_replies: int = 1
    node_wait: float = 600.0
    clients_per_round: int = 0  # 0: every connected node trains
    eval_clients: int = 0  # 0: every connected node evaluates
    seed: int = 0
    reproducible: bool = False
    poisson: bool = False  # Poisson sampling (central DP's accountant assumes it)

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> Sampling:
        return cls(config["num-clients"], config["min-replies"], config["node-wait"],
                   config["clients-per-round"], config["eval-clients"], config["seed"],
                   config["reproducible"], poisson=config["central-dp"])


class NodePool:
    """The federation's nodes: at most `num-clients` of the connected ones each round."""

    def __init__(self, sampling: Sampling, nodes: list[int] | None = None) -> None:
        self.sampling = sampling
        self.nodes = nodes or []  # as of the last round that asked

    def wait_for_all(self, grid: Grid) -> None:
        """Until `num-clients` nodes are connected (FederationError after `node-wait`)."""
        self.nodes = wait_for_nodes(grid, self.sampling.num_clients, self.sampling.node_wait)

    def connected(self, rnd: int, grid: Grid) -> list[int]:
        """This round's clients: the connected nodes, at most `num-clients` of them; with
        fewer than `min-replies` connected, it waits for them."""
        want, least = self.sampling.num_clients, self.sampling.min_replies
        nodes = sorted(grid.get_node_ids())
        if len(nodes) < least:
            log.warning("round %d: %d clients connected, waiting for min-replies=%d", rnd,
                        len(nodes), least)
            nodes = wait_for_nodes(grid, least, self.sampling.node_wait)
        nodes = nodes[:want]
        if nodes != self.nodes:
            log.warning("round %d: %d of %d clients connected", rnd, len(nodes), want)
        self.nodes = nodes
        return nodes

    def for_training(self, rnd: int, grid: Grid) -> tuple[list[int], float]:
        """The round's trainers and their sample rate q (seeded per round when
        reproducible, so that a resumed run draws the same)."""
        s = self.sampling
        rng = random.Random(f"{s.seed}|{rnd}") if s.reproducible else random.SystemRandom()
        return sample_clients(self.connected(rnd, grid), s.clients_per_round, s.num_clients,
                              s.poisson, rng)

    def for_evaluation(self, rnd: int, grid: Grid) -> list[int]:
        """The same first `eval-clients` connected nodes every round (0: all)."""
        nodes = self.connected(rnd, grid)
        return nodes[:self.sampling.eval_clients] if self.sampling.eval_clients else nodes
