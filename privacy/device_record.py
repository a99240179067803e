"""What a deployed device remembers beside its ledger: the plan it accepted for each run,
every refusal with its reason, and the policies it ran under.

`<state>/device.sqlite` (mode 0600, folder 0700). The privacy ledger (ledger.sqlite)
stays the one record of spend; this file says under which plan and for which
coordinator it was spent, and what was refused (`fedslm audit <state>` shows both).
"""

from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from privacy.ledger import private_file

FILE = "device.sqlite"
REASON_MAX = 500  # characters of a refusal's reason and coordinator: they echo its input
_SCHEMA = """
CREATE TABLE IF NOT EXISTS plans (run TEXT PRIMARY KEY, coordinator TEXT NOT NULL,
    accepted TEXT NOT NULL, plan TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS refusals (seq INTEGER PRIMARY KEY, time TEXT NOT NULL,
    run TEXT NOT NULL, coordinator TEXT NOT NULL, round INTEGER NOT NULL,
    kind TEXT NOT NULL, code TEXT NOT NULL, reason TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS policies (seq INTEGER PRIMARY KEY, time TEXT NOT NULL,
    policy TEXT NOT NULL);
"""


@dataclass(frozen=True)
class Refused:
    time: str
    run: str
    coordinator: str
    round: int
    kind: str
    code: str
    reason: str


class DeviceState:
    """Open (or create, with create=True) the device's record in `state_dir`."""

    def __init__(self, state_dir: str | Path, create: bool = True) -> None:
        self.path = Path(state_dir) / FILE
        if create:
            private_file(self.path)
        elif not self.path.is_file():
            raise FileNotFoundError(self.path)
        self._db = sqlite3.connect(self.path, isolation_level=None)
        if create:
            self._db.executescript(_SCHEMA)

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> DeviceState:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def plan(self, run: str) -> dict[str, Any] | None:
        row = self._db.execute("SELECT plan FROM plans WHERE run = ?", (run,)).fetchone()
        return json.loads(row[0]) if row else None

    def accept(self, run: str, coordinator: str, plan: dict[str, Any]) -> None:
        """Record a run's plan; it never changes afterwards."""
        self._db.execute("INSERT INTO plans VALUES (?, ?, ?, ?)",
                         (run, coordinator, _now(), json.dumps(plan, sort_keys=True)))

    def plans(self) -> list[tuple[str, str, str, dict[str, Any]]]:
        rows = self._db.execute("SELECT run, coordinator, accepted, plan FROM plans "
                                "ORDER BY accepted").fetchall()
        return [(r, c, a, json.loads(p)) for r, c, a, p in rows]

    def refuse(self, run: str, coordinator: str, rnd: int, kind: str, code: str,
               reason: str) -> None:
        """Record a refusal; the coordinator's strings in it are cut to REASON_MAX."""
        coordinator, reason = coordinator[:REASON_MAX], reason[:REASON_MAX]
        self._db.execute("INSERT INTO refusals (time, run, coordinator, round, kind, code, "
                         "reason) VALUES (?, ?, ?, ?, ?, ?, ?)",
                         (_now(), run, coordinator, rnd, kind, code, reason))

    def refusals(self) -> list[Refused]:
        rows = self._db.execute("SELECT time, run, coordinator, round, kind, code, reason "
                                "FROM refusals ORDER BY seq").fetchall()
        return [Refused(*row) for row in rows]

    def record_policy(self, policy: dict[str, Any]) -> None:
        """The policy this device runs under from now on (one row per start that changed it)."""
        text = json.dumps(policy, sort_keys=True)
        last = self._db.execute("SELECT policy FROM policies ORDER BY seq DESC LIMIT 1"
                                ).fetchone()
        if not last or last[0] != text:
            self._db.execute("INSERT INTO policies (time, policy) VALUES (?, ?)", (_now(), text))

    def policies(self) -> list[tuple[str, dict[str, Any]]]:
        rows = self._db.execute("SELECT time, policy FROM policies ORDER BY seq").fetchall()
        return [(t, json.loads(p)) for t, p in rows]


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")
