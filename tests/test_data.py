"""Data sources: the embedded Shakespeare split, JSONL and folders, and the held-out split."""

from __future__ import annotations

import json

import pytest

from client import data as data_mod


class CharTokenizer:
    """Enough of a tokenizer for splitting tests: one id per character."""

    eos_token_id = pad_token_id = 0

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [1 + ord(c) % 200 for c in text]}


def test_embedded_shakespeare_is_split_by_role():
    roles = data_mod.partitions("embedded")
    assert len(roles) > 1000
    assert [r.client for r in roles[:3]] == ["hamlet.hamlet", "othello.iago",
                                             "henry-v.king-henry-v"]
    hamlet = roles[0].texts[0]
    assert hamlet.startswith("A little more than kin, and less than kind.")
    assert "**" not in hamlet and "_Exit" not in hamlet  # no speaker tags or stage directions
    assert len(hamlet.splitlines()) > 1400


def test_free_text_is_cut_into_windows_with_every_tenth_held_out():
    part = data_mod.Partition("c", ("x" * 1000,), records=False)
    train, heldout = data_mod.encode(part, CharTokenizer(), 16, max_heldout=100)
    assert len(train) + len(heldout) == -(-1001 // 16)  # 1000 chars + eos, last window shorter
    assert len(heldout) == 6  # windows 9, 19, ..., 59 of 63
    assert train.input_ids.shape[1] == 16
    assert (train.labels[train.attention_mask == 0] == -100).all()
    assert train.fingerprint() != heldout.fingerprint()


def test_jsonl_records_are_examples_and_group_by_client(tmp_path):
    path = tmp_path / "d.jsonl"
    rows = [{"client": f"c{i % 2}", "text": f"record number {i}"} for i in range(40)]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    parts = data_mod.partitions(str(path))
    assert [p.client for p in parts] == ["c0", "c1"] and all(p.records for p in parts)
    train, heldout = data_mod.encode(parts[0], CharTokenizer(), 8, max_heldout=100)
    assert (len(train), len(heldout)) == (18, 2)  # 20 records, one example each, truncated
    path.write_text('{"text": "ok"}\n{"txt": "bad"}\n')
    with pytest.raises(data_mod.DataError, match=r"d.jsonl:2: expected \"text\", \"prompt\""):
        data_mod.partitions(str(path))


def test_folders_of_text_files(tmp_path, text_clients):
    assert [p.client for p in data_mod.partitions(str(text_clients))] == [
        "client-0", "client-1", "client-2"]
    flat = tmp_path / "flat"
    flat.mkdir()
    (flat / "alice.txt").write_text("hello there")
    (flat / "bob.md").write_text("general kenobi")
    assert [p.client for p in data_mod.partitions(str(flat))] == ["alice", "bob"]
    with pytest.raises(data_mod.DataError, match="partition 5 asked"):
        data_mod.partition(str(flat), 5)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(data_mod.DataError, match="no .txt or .md text"):
        data_mod.partitions(str(empty))


def test_too_little_data_for_a_held_out_split():
    part = data_mod.Partition("tiny", ("abc",), records=False)
    with pytest.raises(data_mod.DataError, match="client 'tiny' has 1 examples"):
        data_mod.encode(part, CharTokenizer(), 16, max_heldout=4)
