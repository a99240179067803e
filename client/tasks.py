"""Task evaluation, the lm-evaluation-harness way, run by each client on its own items.

A task is a .jsonl file, one item per line:
- multiple choice: {"prompt": ..., "choices": [...], "answer": its index or its text},
  scored by the log-likelihood of each choice after the prompt (accuracy) and by that
  log-likelihood per character of the choice (normalised accuracy, the harness's acc_norm);
- short answer: {"prompt": ..., "answer": "..." or ["...", ...]}, answered by greedy
  decoding up to a length cap and the first line break, scored by exact match and token
  F1 after SQuAD's normalisation (the best over the accepted answers).
An item may name the one "client" that evaluates it; without one, every client does.
`plays` names the task shipped with the project (client/shakespeare.py).
Prompts are plain text (no chat template), as in the harness.
"""

from __future__ import annotations

import math
import re
import string
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from client import jsonl, shakespeare
from contracts import wire
from contracts.errors import FedslmError

PLAYS = shakespeare.TASK
MAX_TOKENS = 2048  # a longer prompt loses its start, as in the harness


class TaskError(FedslmError):
    """A task file that cannot be read, or an item that is not one of the formats."""


@dataclass(frozen=True)
class MultipleChoice:
    prompt: str
    choices: tuple[str, ...]
    answer: int


@dataclass(frozen=True)
class ShortAnswer:
    prompt: str
    answers: tuple[str, ...]


Item = MultipleChoice | ShortAnswer


def load(spec: str, clients: set[str]) -> list[Item]:
    """The items of task `spec` that these client names evaluate (a client has its
    node name and its data partition's name); TaskError naming file and line."""
    if spec == PLAYS:
        try:
            questions = shakespeare.play_task().questions
        except shakespeare.MissingData as exc:
            raise TaskError(str(exc)) from None
        return [MultipleChoice(q.prompt, q.choices, q.answer) for q in questions
                if q.client in clients]
    return [item for item, client in read_file(spec) if client is None or client in clients]


def check(spec: str) -> None:
    """TaskError unless `spec` is empty, the shipped task (its data installed) or a
    readable task file."""
    if spec == PLAYS:
        load(spec, set())
    elif spec:
        read_file(spec)


def read_file(spec: str) -> list[tuple[Item, str | None]]:
    """(item, the client that evaluates it or None for all) for each line of the file."""
    path = Path(spec).expanduser()
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise TaskError(f"cannot read task file {spec}: {exc}") from None
    out = [pair for _, pair in jsonl.read(path, text, _item_and_client, TaskError, (TaskError,))]
    if not out:
        raise TaskError(f"no items in task file {path}")
    return out


def parse(obj: Any) -> Item:
    """The item a decoded JSON line holds; TaskError saying what is wrong."""
    if not isinstance(obj, dict) or not isinstance(obj.get("prompt"), str) \
            or not obj["prompt"].strip():
        raise TaskError('an item needs "prompt" (a string that is not blank)')
    if "answer" not in obj:
        raise TaskError('an item needs "answer"')
    answer = obj["answer"]
    if "choices" not in obj:
        answers = [answer] if isinstance(answer, str) else answer
        if not isinstance(answers, list) or not answers \
                or not all(isinstance(a, str) for a in answers):
            raise TaskError('a short-answer item\'s "answer" is a string or a list of strings')
        return ShortAnswer(obj["prompt"], tuple(answers))
    choices = obj["choices"]
    if not isinstance(choices, list) or len(choices) < 2 \
            or not all(isinstance(c, str) and c for c in choices):
        raise TaskError('"choices" must be a list of at least two non-empty strings')
    if isinstance(answer, str) and answer in choices:
        answer = choices.index(answer)
    if isinstance(answer, bool) or not isinstance(answer, int) \
            or not 0 <= answer < len(choices):
        raise TaskError(f'"answer" must be an index into the {len(choices)} choices '
                        f'or one of them; got {answer!r}')
    return MultipleChoice(obj["prompt"], tuple(choices), answer)


def _item_and_client(obj: Any) -> tuple[Item, str | None]:
    return parse(obj), _client(obj)


def _client(obj: dict) -> str | None:
    client = obj.get("client")
    if client is not None and not isinstance(client, str):
        raise TaskError('"client" must be a string')
    return client


# ---- scoring ------------------------------------------------------------------

@dataclass(frozen=True)
class TaskSums:
    """Counts that aggregate across clients by adding; ratios are taken at the end."""

    choice_items: int = 0
    choice_correct: int = 0
    choice_correct_norm: int = 0
    answer_items: int = 0
    exact: int = 0
    f1_sum: float = 0.0

    def metrics(self) -> dict[str, float]:
        """As reply metrics (owner-released: contracts/wire.py RELEASES)."""
        return {wire.TASK_CHOICE_ITEMS: self.choice_items,
                wire.TASK_CHOICE_CORRECT: self.choice_correct,
                wire.TASK_CHOICE_CORRECT_NORM: self.choice_correct_norm,
                wire.TASK_ANSWER_ITEMS: self.answer_items,
                wire.TASK_EXACT: self.exact,
                wire.TASK_F1_SUM: self.f1_sum}


def context_and_continuation(prompt: str, choice: str) -> tuple[str, str]:
    """The harness's split: the choice after a space (its target delimiter), and any
    whitespace that ends the prompt moved to the start of the continuation."""
    stripped = prompt.rstrip()
    return stripped, prompt[len(stripped):] + " " + choice


@dataclass(frozen=True)
class ChoiceItem:
    """A multiple-choice item tokenised: each choice's context and continuation tokens
    (the harness's split of the whole text's tokens, so contexts may differ by choice)."""

    answer: int
    contexts: tuple[tuple[int, ...], ...]
    continuations: tuple[tuple[int, ...], ...]
    lengths: tuple[int, ...]  # characters of each choice (for normalised accuracy)


@dataclass(frozen=True)
class EncodedTask:
    """A client's task items, tokenised once."""

    choice: tuple[ChoiceItem, ...]
    short: tuple[tuple[list[int], tuple[str, ...]], ...]  # (prompt ids, accepted answers)

    def __len__(self) -> int:
        return len(self.choice) + len(self.short)


def encode(items: list[Item], tokenizer: Any) -> EncodedTask:
    return EncodedTask(
        tuple(_choice_item(i, tokenizer) for i in items if isinstance(i, MultipleChoice)),
        tuple((_ids(tokenizer, i.prompt), i.answers) for i in items
              if isinstance(i, ShortAnswer)))


def _choice_item(item: MultipleChoice, tokenizer: Any) -> ChoiceItem:
    """As the harness does: the whole text tokenised, split where the context's own
    tokens end, and at most MAX_TOKENS + 1 tokens kept from the end."""
    contexts, continuations = [], []
    for choice in item.choices:
        context, continuation = context_and_continuation(item.prompt, choice)
        whole = _ids(tokenizer, context + continuation)
        n_cont = max(len(whole) - len(_ids(tokenizer, context)), 1)
        kept = whole[-(MAX_TOKENS + 1):]
        n_cont = min(n_cont, len(kept) - 1) or len(kept)
        # an empty context is the end-of-text token, as in the harness
        contexts.append(tuple(kept[:-n_cont]) or (tokenizer.eos_token_id,))
        continuations.append(tuple(kept[-n_cont:]))
    return ChoiceItem(item.answer, tuple(contexts), tuple(continuations),
                      tuple(len(c) for c in item.choices))


def _ids(tokenizer: Any, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


@torch.inference_mode()
def choice_logliks(model: Any, item: ChoiceItem) -> torch.Tensor:
    """The log-likelihood of each choice's continuation after its context: shape [C],
    fp32. The context goes through the model once for the choices that share it; its
    key-value cache then serves all of them in one batch."""
    model.eval()
    device = next(model.parameters()).device
    out = torch.empty(len(item.continuations), dtype=torch.float32)
    for context in dict.fromkeys(item.contexts):
        index = [i for i, c in enumerate(item.contexts) if c == context]
        conts = [item.continuations[i] for i in index]
        prompt = model(input_ids=torch.tensor([context], device=device), use_cache=True,
                       logits_to_keep=1)
        first = torch.log_softmax(prompt.logits[0, -1].float(), dim=-1).cpu()
        scores = [float(first[c[0]]) for c in conts]
        width = max(len(c) for c in conts) - 1
        if width > 0:  # the later tokens of the continuations, batched on the cache
            rest = _rest_logprobs(model, prompt.cache, context, conts, width, device)
            scores = [score + sum(float(rest[j, t, tok]) for t, tok in enumerate(c[1:]))
                      for j, (score, c) in enumerate(zip(scores, conts, strict=True))]
        out[index] = torch.tensor(scores)
    return out


def _rest_logprobs(model: Any, cache: Any, context: tuple[int, ...],
                   conts: list[tuple[int, ...]], width: int,
                   device: torch.device) -> torch.Tensor:
    """[choices, width, vocab] log-probabilities after each continuation's tokens but
    its last (right-padded: a padded position is never read)."""
    ids = torch.zeros((len(conts), width), dtype=torch.long)
    mask = torch.zeros((len(conts), len(context) + width), dtype=torch.long)
    mask[:, :len(context)] = 1
    for j, c in enumerate(conts):
        ids[j, :len(c) - 1] = torch.tensor(c[:-1])
        mask[j, len(context):len(context) + len(c) - 1] = 1
    cache.batch_repeat_interleave(len(conts))
    logits = model(input_ids=ids.to(device), attention_mask=mask.to(device),
                   cache=cache, use_cache=True).logits
    return torch.log_softmax(logits.float(), dim=-1).cpu()


def argmax_first(scores: torch.Tensor) -> int:
    """The index of the highest score, the first of equal ones (NaN counts as lowest)."""
    scores = torch.nan_to_num(scores, nan=-math.inf)
    return int(torch.nonzero(scores == scores.max())[0])


def score_choices(model: Any, items: tuple[ChoiceItem, ...]) -> tuple[int, int]:
    """(correct, correct by log-likelihood per character of the choice: the harness's
    acc_norm) over the items."""
    correct = correct_norm = 0
    for item in items:
        logliks = choice_logliks(model, item)
        correct += argmax_first(logliks) == item.answer
        correct_norm += argmax_first(logliks / torch.tensor(item.lengths)) == item.answer
    return correct, correct_norm


@torch.inference_mode()
def greedy_answer(model: Any, tokenizer: Any, prompt_ids: list[int], max_new_tokens: int) -> str:
    """The greedy continuation of the prompt up to `max_new_tokens` or its first line
    break (the harness's `until`), whichever comes first."""
    device = next(model.parameters()).device
    ids = torch.tensor([prompt_ids[-max(1, MAX_TOKENS - max_new_tokens):]], device=device)
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                         max_new_tokens=max_new_tokens, do_sample=False, top_p=None,
                         top_k=None, temperature=None, pad_token_id=tokenizer.pad_token_id,
                         stop_strings=["\n"], tokenizer=tokenizer)
    return first_line(tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True))


def first_line(text: str) -> str:
    """The answer in a generated text: what comes before its first line break."""
    return text.split("\n", 1)[0].strip()


def evaluate(model: Any, tokenizer: Any, task: EncodedTask, max_new_tokens: int) -> TaskSums:
    correct, correct_norm = score_choices(model, task.choice)
    exact, f1 = 0, 0.0
    for prompt_ids, references in task.short:
        answer = greedy_answer(model, tokenizer, prompt_ids, max_new_tokens)
        exact += max(exact_match(answer, r) for r in references)
        f1 += max(token_f1(answer, r) for r in references)
    return TaskSums(len(task.choice), correct, correct_norm, len(task.short), exact, f1)


# ---- SQuAD's answer normalisation ------------------------------------------------

def normalize(text: str) -> str:
    """Lower case, no punctuation, no articles (a, an, the), single spaces."""
    text = "".join(c for c in text.lower() if c not in set(string.punctuation))
    return " ".join(re.sub(r"\b(a|an|the)\b", " ", text).split())


def exact_match(prediction: str, reference: str) -> int:
    return int(normalize(prediction) == normalize(reference))


def token_f1(prediction: str, reference: str) -> float:
    predicted, expected = normalize(prediction).split(), normalize(reference).split()
    if not predicted or not expected:
        return float(predicted == expected)
    common = sum((Counter(predicted) & Counter(expected)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(predicted), common / len(expected)
    return 2 * precision * recall / (precision + recall)
