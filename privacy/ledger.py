"""A client's privacy ledger: an append-only, hash-chained SQLite file.

Every local training round appends one entry *before* the update leaves the
client: the mechanism it ran (noise multiplier, sample rate, steps, δ) and the
cumulative ε it brings the dataset to. Each entry's hash covers its fields and
the previous entry's hash, so an edit, deletion or reordering breaks the chain.
A ledger that disappears as a whole is caught elsewhere: each ledger has a random id,
sent with every reply, and the server flags a client whose ledger id changes or whose
cumulative ε goes down (server/spend.py).

The file is created readable by its owner only (0600) in a folder of mode 0700.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import sqlite3
from dataclasses import asdict, dataclass
from pathlib import Path

from contracts.errors import FedslmError
from contracts.rundir import private_dir
from privacy.accountant import ADD_REMOVE, Mechanism

GENESIS = "0" * 64
SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS entries (
    seq INTEGER PRIMARY KEY,
    body TEXT NOT NULL,
    prev_hash TEXT NOT NULL,
    hash TEXT NOT NULL
);
CREATE TRIGGER IF NOT EXISTS entries_no_update BEFORE UPDATE ON entries
BEGIN SELECT RAISE(ABORT, 'the privacy ledger is append-only'); END;
CREATE TRIGGER IF NOT EXISTS entries_no_delete BEFORE DELETE ON entries
BEGIN SELECT RAISE(ABORT, 'the privacy ledger is append-only'); END;
"""


class LedgerError(FedslmError):
    """A ledger file that cannot be read or written as a ledger."""


@dataclass(frozen=True)
class Entry:
    """One local training round's privacy spend."""

    run_id: str
    round: int
    client: str
    dataset: str  # fingerprint of the training data
    noise_multiplier: float
    sample_rate: float
    steps: int
    delta: float
    accountant: str
    epsilon: float  # cumulative, over every entry up to and including this one
    time: str
    budget_epsilon: float | None = None  # the data owner's budget when this was charged
    budget_delta: float | None = None
    # the neighbouring relation `epsilon` was computed under; entries written before
    # fedslm recorded it were charged under add-remove (Opacus' RDP)
    relation: str = ADD_REMOVE
    # the noise and sampling were derived from a seed (`reproducible`): whoever knows the
    # seed can subtract the noise, so this entry counts as no noise at all (ε = ∞)
    seeded: bool = False

    @property
    def mechanism(self) -> Mechanism:
        """What this entry's release cost, as every accountant sees it."""
        return (0.0 if self.seeded else self.noise_multiplier, self.sample_rate, self.steps)

    @property
    def planned(self) -> Mechanism:
        """The mechanism as planned (σ as drawn), also for a seeded entry."""
        return (self.noise_multiplier, self.sample_rate, self.steps)


def _digest(prev_hash: str, body: str) -> str:
    return hashlib.sha256(f"{prev_hash}\n{body}".encode()).hexdigest()


class Ledger:
    """Open (or create) the ledger at `path`."""

    def __init__(self, path: str | Path, create: bool = True) -> None:
        self.path = Path(path)
        if not create and not self.path.is_file():
            raise LedgerError(f"no ledger at {self.path}")
        if create:
            private_file(self.path)
        try:
            self._db = sqlite3.connect(self.path, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            if create:
                self._db.executescript(_SCHEMA)
                self._db.execute(
                    "INSERT OR IGNORE INTO meta VALUES ('schema', ?)", (str(SCHEMA_VERSION),)
                )
                self._db.execute("INSERT OR IGNORE INTO meta VALUES ('ledger-id', ?)",
                                 (secrets.token_hex(8),))
            self._db.execute("SELECT seq, body, prev_hash, hash FROM entries LIMIT 1").fetchall()
        except sqlite3.DatabaseError as exc:
            raise LedgerError(f"{self.path} is not a fedslm privacy ledger ({exc})") from exc

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> Ledger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def ledger_id(self) -> str:
        """A random id given at creation: a new file (a deleted ledger) has a new one."""
        row = self._db.execute("SELECT value FROM meta WHERE key = 'ledger-id'").fetchone()
        return row[0] if row else ""

    def _rows(self) -> list[tuple[int, str, str, str]]:
        query = "SELECT seq, body, prev_hash, hash FROM entries ORDER BY seq"
        return self._db.execute(query).fetchall()

    def entries(self) -> list[Entry]:
        return [Entry(**json.loads(body)) for _, body, _, _ in self._rows()]

    def history(self) -> list[Mechanism]:
        return [e.mechanism for e in self.entries()]

    def append(self, entry: Entry) -> None:
        """Append durably: the entry is on disk when this returns."""
        body = json.dumps(asdict(entry), sort_keys=True)
        self._db.execute("BEGIN IMMEDIATE")
        try:
            last = self._db.execute("SELECT hash FROM entries ORDER BY seq DESC LIMIT 1").fetchone()
            prev = last[0] if last else GENESIS
            self._db.execute(
                "INSERT INTO entries (body, prev_hash, hash) VALUES (?, ?, ?)",
                (body, prev, _digest(prev, body)),
            )
            self._db.execute("COMMIT")
        except BaseException:
            self._db.execute("ROLLBACK")
            raise

    def verify(self) -> list[str]:
        """Problems with the chain, each naming the entry; empty when intact."""
        problems = []
        prev = GENESIS
        for expected_seq, (seq, body, prev_hash, digest) in enumerate(self._rows(), start=1):
            if seq != expected_seq:
                problems.append(f"entry {expected_seq}: missing (next stored entry is {seq})")
            if prev_hash != prev:
                problems.append(f"entry {seq}: does not follow the previous entry's hash")
            if _digest(prev_hash, body) != digest:
                problems.append(f"entry {seq}: contents do not match its hash (edited)")
            prev = digest
        return problems


def private_file(path: Path) -> None:
    """Create `path` empty with mode 0600 in a folder of mode 0700, unless it exists.
    SQLite gives its -wal and -shm files the database file's mode."""
    private_dir(path.parent)
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except FileExistsError:
        pass
