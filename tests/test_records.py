"""Instruction and chat data (TRL's SFT formats): the tokens of each format, the
completion-only loss mask token by token, truncation, and bad records named by file:line."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from client import data as data_mod
from client import records
from fedslm.cli import main

# ChatML as SmolLM2 writes it, without its default system prompt
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.fixture
def tokenizer(tiny_model):
    tok = AutoTokenizer.from_pretrained(tiny_model)
    tok.chat_template = CHATML
    return tok


def _row(record: dict, tokenizer, seq_len: int = 512, completion_only: bool = True):
    part = data_mod.Partition("c", (records.parse(record),), records=True)
    ((ids, trained),) = data_mod._rows(part, tokenizer, seq_len, completion_only)
    return ids, trained


def _trained_text(ids, trained, tokenizer) -> list[str]:
    """The decoded runs of trained tokens, in order."""
    runs, run = [], []
    for token, learn in zip(ids, trained, strict=True):
        if learn:
            run.append(token)
        elif run:
            runs.append(run)
            run = []
    runs += [run] if run else []
    return [tokenizer.decode(r) for r in runs]


def test_text_is_trained_on_every_token(tokenizer):
    ids, trained = _row({"text": "to be or not to be"}, tokenizer)
    assert ids == tokenizer("to be or not to be", add_special_tokens=False)["input_ids"]
    assert all(trained)


def test_prompt_completion_trains_on_the_completion_only(tokenizer):
    prompt, completion = "Who said it? ", "Hamlet."
    ids, trained = _row({"prompt": prompt, "completion": completion}, tokenizer)
    head = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    tail = tokenizer(completion, add_special_tokens=False)["input_ids"]
    assert ids == head + tail
    assert trained == [False] * len(head) + [True] * len(tail)  # token by token
    _, everything = _row({"prompt": prompt, "completion": completion}, tokenizer,
                         completion_only=False)
    assert all(everything)


def test_a_conversation_trains_on_each_assistant_turn_rendered_by_the_template(tokenizer):
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Who is the Dane?"},
                {"role": "assistant", "content": "Hamlet."},
                {"role": "user", "content": "And the Moor?"},
                {"role": "assistant", "content": "Othello."}]
    ids, trained = _row({"messages": messages}, tokenizer)
    assert tokenizer.decode(ids) == tokenizer.apply_chat_template(messages, tokenize=False)
    assert _trained_text(ids, trained, tokenizer) == ["Hamlet.<|im_end|>\n",
                                                      "Othello.<|im_end|>\n"]


def test_a_conversational_prompt_completion(tokenizer):
    record = {"prompt": [{"role": "user", "content": "Name a king."}],
              "completion": [{"role": "assistant", "content": "Henry V."}]}
    ids, trained = _row(record, tokenizer)
    assert _trained_text(ids, trained, tokenizer) == ["Henry V.<|im_end|>\n"]
    assert tokenizer.decode(ids).startswith("<|im_start|>user\nName a king.<|im_end|>\n"
                                            "<|im_start|>assistant\n")


def test_long_records_are_truncated_never_split(tokenizer, caplog):
    part = data_mod.Partition("c", tuple(records.parse({"text": "word " * n})
                                         for n in (3, 200, 300)), records=True)
    with caplog.at_level(logging.INFO, logger="fedslm"):
        rows = data_mod._rows(part, tokenizer, 16)
    assert len(rows) == 3 and [len(ids) for ids, _ in rows] == [
        min(16, len(tokenizer("word " * n, add_special_tokens=False)["input_ids"]))
        for n in (3, 200, 300)]
    assert "client c: 2 of 3 records longer than 16 tokens were truncated" in caplog.text


def test_conversations_need_a_chat_template(tiny_model):
    plain = AutoTokenizer.from_pretrained(tiny_model)
    plain.chat_template = None
    with pytest.raises(data_mod.DataError, match="need a chat template"):
        _row({"messages": [{"role": "user", "content": "hi"},
                           {"role": "assistant", "content": "hello"}]}, plain)


@pytest.mark.parametrize("line, problem", [
    ("not json", "not JSON"),
    ('["a list"]', "expected a JSON object"),
    ('{"txt": "typo"}', 'expected "text", "prompt" and "completion", or "messages"'),
    ('{"text": 3}', '"text" must be a string'),
    ('{"prompt": "only a prompt"}', 'needs both "prompt" and "completion"'),
    ('{"prompt": "a", "completion": [{"role": "assistant", "content": "b"}]}',
     "both be strings or both be lists"),
    ('{"messages": []}', '"messages" must be a non-empty list'),
    ('{"messages": [{"role": "king", "content": "x"}]}', "has role 'king'"),
    ('{"messages": [{"role": "user", "content": "hi"}]}', "has no assistant message"),
    ('{"messages": [{"role": "user"}]}', 'must be an object with a string "content"'),
])
def test_a_bad_record_is_named_by_file_and_line(tmp_path, line, problem):
    path = tmp_path / "chat.jsonl"
    good = json.dumps({"messages": [{"role": "user", "content": "a"},
                                    {"role": "assistant", "content": "b"}]})
    path.write_text(f"{good}\n\n{line}\n{good}\n")
    with pytest.raises(data_mod.DataError) as err:
        data_mod.partitions(str(path))
    assert str(err.value).startswith(f"{path}:3: ") and problem in str(err.value)


def test_a_bad_record_stops_the_run_before_training(tiny_model, tmp_path, capsys):
    path = tmp_path / "chat.jsonl"
    path.write_text('{"text": "fine"}\n{"messages": "oops"}\n')
    out = tmp_path / "runs"
    code = main(["simulate", "--out", str(out), "--set", f"model={tiny_model}",
                 "--set", f"data={path}", "--clients", "1"])
    assert code == 2
    assert f"{path}:2: \"messages\" must be a non-empty list" in capsys.readouterr().err
    assert not list(tmp_path.rglob("ledger.sqlite"))  # nothing charged


def test_a_federation_trains_on_prompt_completion_records(tiny_model, tmp_path):
    from tests.test_simulation import _fedslm

    path = tmp_path / "qa.jsonl"
    lines = [{"client": f"c{i % 2}", "prompt": f"Question {i}: who speaks? ",
              "completion": ["Hamlet.", "Iago."][i % 2]} for i in range(60)]
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    out = _fedslm(["simulate", "--clients", "2", "--rounds", "1", "--local-steps", "2",
                   "--out", str(tmp_path / "runs"), "--set", f"model={tiny_model}",
                   "--set", f"data={path}", "--set", "seq-len=32", "--set", "batch-size=4"],
                  tmp_path / "cache")
    assert out.returncode == 0, out.stderr[-3000:]
    run_dir = Path(out.stdout.strip().splitlines()[-1])
    line = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])
    assert {c["client"]: c["num_examples"] for c in line["clients"]} == {"c0": 27, "c1": 27}
    assert all(c["status"] == "trained" for c in line["clients"])
