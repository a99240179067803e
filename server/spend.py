"""The server's record of each client's privacy spend, so that a ledger deleted or reset
on a device does not reset the spend silently (the hash chain protects edits, not the
disappearance of the whole file).

Every reply carries the client's cumulative ε and its ledger's random id (privacy/
ledger.py). A client is flagged when its ledger id changes while the server has seen
spend from it (a new ledger file), or when its cumulative ε goes down. Flags go to the
round's line in metrics.jsonl (`privacy_flags`: the client's name, its node and the
problem), the server's log, and `fedslm audit`.

The record is kept by node, not by the name a client declares (`spend_key` says why);
the name is kept beside each entry for people. It lives in the run's checkpoint (a
resumed run keeps it) and, across runs, in <out>/.privacy-spend.json, the server's
memory of every node it has served (a simulation's: <out>/.privacy-spend-simulation.json).
A simulation whose clients keep their ledgers inside its run directory (`state-root`
unset) starts new ledgers by design and does not use the cross-run file. A record or
registry of an older fedslm, keyed by client names, is not trusted: the checkpoint's is
dropped and the registry kept aside, each with a warning.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from contracts.rundir import write_json
from contracts.wire import EPSILON, LEDGER_ID, epsilon_from_json, epsilon_from_wire
from server.replies import Reply

log = logging.getLogger("fedslm")
REGISTRY = ".privacy-spend.json"  # hidden: <out> lists run directories
SIMULATION_REGISTRY = ".privacy-spend-simulation.json"  # keyed by client names
TOLERANCE = 1e-9  # relative: the same history gives the same ε, bit for bit
BY_NODE, BY_NAME = "node", "client"  # what a record's keys are ("key" in its JSON)


def spend_key(reply: Reply, simulation: bool) -> str:
    """Whose spend a reply reports: the one place that decides it.

    In a deployment, the node's Flower id. The SuperLink assigns it when the node's
    public key is registered (`flwr supernode register`, kept in the SuperLink's
    database across runs and restarts), and with SuperNode authentication every message
    of the node is signed with that key: no other node can speak for it. The client name
    in a reply is the node's own claim, which any node could copy to fake or hide
    another's ledger reset. (Without a SuperNode key, as with `--insecure`, a node draws
    a new key, hence a new id, each time it starts: the record cannot follow it across
    restarts.)

    In a simulation, the client name. Flower's simulation engine registers every
    simulated node under a random id in each run (different ids in two runs of the same
    clients), so a node id would not find the client's earlier spend; and every client is
    this machine's own code, with no one to impersonate.
    """
    return reply.client if simulation else str(reply.node)


def registry_path(out: Path, simulation: bool) -> Path:
    return out / (SIMULATION_REGISTRY if simulation else REGISTRY)


@dataclass
class Seen:
    """The last spend a node reported, and the client name it gave."""

    epsilon: float
    ledger_id: str
    run_id: str
    round: int
    client: str = ""


class SpendRecord:
    """Per node (per client name in a simulation), the last (ε, ledger id) the server was
    told; `check` flags a reset."""

    def __init__(self, simulation: bool = False, seen: dict[str, Seen] | None = None,
                 registry: Path | None = None) -> None:
        self.simulation = simulation
        self.seen = dict(seen or {})
        self.registry = registry
        for key, known in self._read_registry().items():
            self.seen.setdefault(key, known)

    @property
    def kind(self) -> str:
        return _kind(self.simulation)

    @classmethod
    def from_json(cls, data: dict[str, Any], simulation: bool,
                  registry: Path | None) -> SpendRecord:
        """The record a checkpoint kept (`to_json`); one of another kind (an older
        fedslm's, by client name) is dropped with a warning."""
        seen = _entries(data, _kind(simulation))
        if data and seen is None:
            log.warning("the checkpoint's privacy spend record is not keyed by %s: dropped "
                        "(the cross-run registry, if any, still holds what it knew)",
                        _kind(simulation))
        return cls(simulation, seen, registry)

    def to_json(self) -> dict[str, Any]:
        return {"key": self.kind, "seen": {k: asdict(s) for k, s in sorted(self.seen.items())}}

    def check(self, replies: Iterable[Reply], run_id: str, rnd: int) -> list[dict[str, Any]]:
        """Flags for the replies' nodes, and the record updated with what they said."""
        flags = []
        for reply in replies:
            key = spend_key(reply, self.simulation)
            ledger_id = reply.info.get(LEDGER_ID, "")  # "": the client has no ledger
            if EPSILON not in reply.metrics or (not ledger_id and key not in self.seen):
                continue  # nothing spent yet, nothing known: nothing to compare
            eps = epsilon_from_wire(reply.metrics[EPSILON])
            problem = _problem(self.seen.get(key), eps, ledger_id)
            if problem:
                flags.append({"client": reply.client, "node": reply.node, "problem": problem})
                log.warning("round %d: client %s (node %s): %s", rnd, reply.client,
                            reply.node, problem)
            self.seen[key] = Seen(eps, ledger_id, run_id, rnd, reply.client)
        if self.registry:
            write_json(self.registry, self.to_json())
        return flags

    def _read_registry(self) -> dict[str, Seen]:
        path = self.registry
        if path is None or not path.is_file():
            return {}
        try:
            seen = _entries(json.loads(path.read_text()), self.kind)
        except (OSError, ValueError, TypeError, KeyError, AttributeError) as exc:
            seen, why, suffix = None, f"unreadable ({exc})", ".unreadable.json"
        else:
            why, suffix = f"not keyed by {self.kind} (an older fedslm's?)", ".old.json"
        if seen is None:
            # kept for a person to look at; a new one is started beside it
            kept = path.with_suffix(suffix)
            path.replace(kept)
            log.warning("%s is %s: kept as %s, a new one is started", path, why, kept)
            return {}
        return seen


def _kind(simulation: bool) -> str:
    return BY_NAME if simulation else BY_NODE


def _entries(data: Any, kind: str) -> dict[str, Seen] | None:
    """The entries of a record's JSON keyed by `kind`; None for any other JSON (a
    flat {client name: entry} is an older fedslm's)."""
    if not isinstance(data, dict) or data.get("key") != kind:
        return None
    return {str(k): Seen(**{**v, "epsilon": epsilon_from_json(v["epsilon"])})  # null: ∞
            for k, v in data["seen"].items()}


def _problem(known: Seen | None, eps: float, ledger_id: str) -> str:
    if known is None:
        return ""
    where = f"run {known.run_id} round {known.round}"
    if not ledger_id and known.epsilon > 0:
        return (f"no privacy ledger while this server saw ε={known.epsilon:.4f} from "
                f"ledger {known.ledger_id} ({where}): deleted?")
    if ledger_id != known.ledger_id and known.epsilon > 0:
        return (f"new privacy ledger (id {ledger_id}, ε={eps:.4f}) while this server saw "
                f"ε={known.epsilon:.4f} from ledger {known.ledger_id} ({where}): "
                "deleted or replaced?")
    if eps < known.epsilon * (1 - TOLERANCE):
        return (f"cumulative ε went down from {known.epsilon:.4f} ({where}) to "
                f"{eps:.4f}: ledger reset or rolled back?")
    return ""
