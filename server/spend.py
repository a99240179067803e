"""The server's record of each client's privacy spend, so that a ledger deleted or reset
on a device does not reset the spend silently (the hash chain protects edits, not the
disappearance of the whole file).

Every reply carries the client's cumulative ε and its ledger's random id (privacy/
ledger.py). A client is flagged when its ledger id changes while the server has seen
spend from it (a new ledger file), or when its cumulative ε goes down. Flags go to the
round's line in metrics.jsonl (`privacy_flags`), the server's log, and `fedslm audit`.

The record lives in the run's checkpoint (a resumed run keeps it) and, across runs, in
<out>/.privacy-spend.json, the server's memory of every client it has served. A
simulation whose clients keep their ledgers inside its run directory (`state-root`
unset) starts new ledgers by design and does not use the cross-run file.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from contracts.rundir import write_json
from contracts.wire import EPSILON, LEDGER_ID, epsilon_from_wire
from server.replies import Reply

log = logging.getLogger("fedslm")
REGISTRY = ".privacy-spend.json"  # hidden: <out> lists run directories
TOLERANCE = 1e-9  # relative: the same history gives the same ε, bit for bit


@dataclass
class Seen:
    """The last spend a client reported."""

    epsilon: float
    ledger_id: str
    run_id: str
    round: int


class SpendRecord:
    """Per client, the last (ε, ledger id) the server was told; `check` flags a reset."""

    def __init__(self, seen: dict[str, Seen] | None = None,
                 registry: Path | None = None) -> None:
        self.seen = dict(seen or {})
        self.registry = registry
        for client, known in _read_registry(registry).items():
            self.seen.setdefault(client, known)

    @classmethod
    def from_json(cls, data: dict[str, Any], registry: Path | None) -> SpendRecord:
        return cls({c: Seen(**v) for c, v in data.items()}, registry)

    def to_json(self) -> dict[str, Any]:
        return {c: asdict(s) for c, s in sorted(self.seen.items())}

    def check(self, replies: Iterable[Reply], run_id: str, rnd: int) -> list[dict[str, str]]:
        """Flags for the replies' clients, and the record updated with what they said."""
        flags = []
        for reply in replies:
            ledger_id = reply.info.get(LEDGER_ID, "")  # "": the client has no ledger
            if EPSILON not in reply.metrics or (not ledger_id and reply.client not in self.seen):
                continue  # nothing spent yet, nothing known: nothing to compare
            eps = epsilon_from_wire(reply.metrics[EPSILON])
            problem = self._problem(reply.client, eps, ledger_id)
            if problem:
                flags.append({"client": reply.client, "problem": problem})
                log.warning("round %d: client %s: %s", rnd, reply.client, problem)
            self.seen[reply.client] = Seen(eps, ledger_id, run_id, rnd)
        if self.registry:
            write_json(self.registry, self.to_json())
        return flags

    def _problem(self, client: str, eps: float, ledger_id: str) -> str:
        known = self.seen.get(client)
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


def _read_registry(path: Path | None) -> dict[str, Seen]:
    if path is None or not path.is_file():
        return {}
    try:
        return {c: Seen(**v) for c, v in json.loads(path.read_text()).items()}
    except (OSError, ValueError, TypeError) as exc:
        # keep the damaged file for a person to look at; start a new one beside it
        kept = path.with_suffix(".unreadable.json")
        path.replace(kept)
        log.warning("%s is unreadable (%s): kept as %s, a new one is started", path, exc, kept)
        return {}
