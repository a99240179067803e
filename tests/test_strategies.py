"""Aggregation strategies against hand-computed results, and the client side of FFA-LoRA
and heterogeneous ranks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from client import adapter as adapter_mod
from client import base_model as model_mod
from client.cache import Session
from client.rounds import evaluate_round, train_round
from contracts import codec
from contracts.adapter import cut_to_rank, sent_part
from contracts.config import ConfigError, validate
from server.strategies import fedavg, hetlora
from tests.helpers import client_settings

A, B = "m.lora_A.weight", "m.lora_B.weight"


def _adapter(a: list, b: list) -> dict[str, np.ndarray]:
    return {A: np.array(a, np.float32), B: np.array(b, np.float32)}


def test_fedavg_by_hand():
    one = _adapter([[1, 2]], [[3], [4]])
    two = _adapter([[5, 6]], [[7], [8]])
    out = fedavg([(one, 1), (two, 3)])  # weights 1/4 and 3/4
    np.testing.assert_allclose(out[A], [[4, 5]])
    np.testing.assert_allclose(out[B], [[6], [7]])


def test_ffa_lora_aggregate_is_the_exact_mean_update():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(2, 5)).astype(np.float32)  # the shared frozen A
    bs = [rng.normal(size=(3, 2)).astype(np.float32) for _ in range(3)]
    weights = [10, 20, 70]
    pairs = list(zip(bs, weights, strict=True))
    out = fedavg([(sent_part({A: a, B: b}, "ffa-lora"), w) for b, w in pairs])
    assert set(out) == {B}  # A is never sent
    mean_update = sum(w * (b @ a) for b, w in zip(bs, weights, strict=True)) / sum(weights)
    np.testing.assert_allclose(out[B] @ a, mean_update, rtol=1e-5, atol=1e-6)
    # fedavg of both factors is not exact: the mean of products is not the product of means
    other_as = [a, a + 1.0, a - 0.5]
    both = fedavg([({A: x, B: b}, w) for x, b, w in zip(other_as, bs, weights, strict=True)])
    exact = sum(w * (b @ x) for x, b, w in zip(other_as, bs, weights, strict=True)) / sum(weights)
    assert not np.allclose(both[B] @ both[A], exact, atol=1e-3)


def test_hetlora_mixed_ranks_by_hand():
    rank4 = _adapter([[1, 1], [2, 2], [3, 3], [4, 4]], [[1, 2, 3, 4]])
    rank2 = _adapter([[5, 5], [6, 6]], [[5, 6]])
    rank1 = _adapter([[9, 9]], [[9]])
    out = hetlora([(rank4, 1), (rank2, 1), (rank1, 2)], rank=4)
    # component 0: (1 + 5 + 2*9) / 4; component 1: (2 + 6) / 2; components 2, 3: rank4 only
    np.testing.assert_allclose(out[A], [[6, 6], [4, 4], [3, 3], [4, 4]])
    np.testing.assert_allclose(out[B], [[6, 4, 3, 4]])
    assert out[A].dtype == np.float32


def test_hetlora_with_equal_ranks_is_fedavg_and_leaves_untrained_components_zero():
    one, two = _adapter([[1, 2], [3, 4]], [[1, 2]]), _adapter([[5, 6], [7, 8]], [[3, 4]])
    same = hetlora([(one, 1), (two, 3)], rank=2)
    ref = fedavg([(one, 1), (two, 3)])
    assert all(np.allclose(same[k], ref[k]) for k in ref)
    wider = hetlora([(one, 1)], rank=3)
    np.testing.assert_array_equal(wider[A][2], [0, 0])
    np.testing.assert_array_equal(cut_to_rank(wider, 2)[B], one[B])


def test_a_rank_r_start_is_the_first_r_rows_of_a_larger_start(tiny_model):
    fp32 = model_mod.Quantization("none", "float32", "test")
    adapters = {}
    for r in (2, 8):
        base, _ = model_mod.load_base(str(tiny_model), fp32, torch.device("cpu"))
        adapters[r] = adapter_mod.get_adapter(
            adapter_mod.attach_lora(base, r, 8.0, 0.0, ["q_proj", "v_proj"], seed=5))
    small = cut_to_rank(adapters[8], 2)
    assert all(np.array_equal(small[k], adapters[2][k]) for k in small)


def test_ffa_lora_client_trains_and_sends_only_b(tiny_model, text_clients, tmp_path):
    Session.forget()
    s = client_settings(tiny_model, text_clients, tmp_path, strategy="ffa-lora", lora_r=4,
                        local_steps=3)
    initial, _, _ = evaluate_round(s, {})
    received = sent_part(initial, "ffa-lora")
    raw, metrics, _ = train_round(s, received)
    sent = codec.decode(*codec.unpack(raw), received)  # the default int8-delta encoding
    assert set(sent) == {k for k in initial if ".lora_B." in k}
    assert any(np.abs(v).sum() > 0 for v in sent.values())  # B trained
    after = adapter_mod.get_adapter(Session._current.model)
    assert all(np.array_equal(after[k], initial[k]) for k in initial if ".lora_A." in k)
    # a second round from the aggregated B: A is rebuilt from the seed, still the same
    s2 = client_settings(tiny_model, text_clients, tmp_path, strategy="ffa-lora", lora_r=4,
                         server_round=2)
    train_round(s2, sent)
    again = adapter_mod.get_adapter(Session._current.model)
    assert all(np.array_equal(again[k], initial[k]) for k in initial if ".lora_A." in k)
    Session.forget()


def test_hetlora_client_rank_comes_from_its_profile_and_scales_alpha(tiny_model, text_clients,
                                                                     tmp_path):
    pi = client_settings(tiny_model, text_clients, tmp_path, strategy="hetlora", lora_r=8,
                         lora_alpha=16, device_profile="raspberry-pi-5")
    assert (pi.lora_r, pi.lora_alpha) == (2, 4.0)  # alpha / r stays 2
    server = client_settings(tiny_model, text_clients, tmp_path, strategy="hetlora",
                             lora_r=8, device_profile="server-cpu")
    assert server.lora_r == 8  # capped at the global rank
    plain = client_settings(tiny_model, text_clients, tmp_path, lora_r=8,
                            device_profile="raspberry-pi-5")
    assert plain.lora_r == 8  # other strategies: one rank for all

    Session.forget()
    global_adapter, _, _ = evaluate_round(server, {})
    Session.forget()
    raw, _, _ = train_round(pi, global_adapter)  # the rank-8 global cut to rank 2
    sent, _ = codec.unpack(raw)
    assert {v.shape[0] for k, v in sent.items() if ".lora_A." in k} == {2}
    assert {v.shape[1] for k, v in sent.items() if ".lora_B." in k} == {2}
    Session.forget()


def test_strategy_settings_are_checked():
    with pytest.raises(ConfigError, match="'strategy' must be one of fedavg, ffa-lora, hetlora"):
        validate({"strategy": "fedprox"})
    with pytest.raises(ConfigError, match="central-dp needs updates of one shape"):
        validate({"strategy": "hetlora", "central-dp": True})
    with pytest.raises(ConfigError, match="'dropout-rate' must be in"):
        validate({"dropout-rate": 1.5})


@pytest.mark.slow
def test_a_sweep_on_a_tiny_model_writes_one_row_per_run(tiny_model, text_clients, tmp_path):
    import csv
    import os
    import subprocess
    import sys

    from safetensors.numpy import load_file

    from contracts.rundir import read_metrics

    sweep_file = tmp_path / "sweep.toml"
    sweep_file.write_text(
        f'model = "{tiny_model}"\ndata = "{text_clients}"\nnum-clients = 3\n'
        'num-server-rounds = 2\nseq-len = 32\nbatch-size = 4\nlocal-steps = 2\nlora-r = 4\n'
        'max-eval-seqs = 4\nsimulated-profiles = "server-cpu,laptop,raspberry-pi-5"\n'
        '[grid]\nstrategy = ["fedavg", "ffa-lora"]\n'
        '[[extra]]\nstrategy = "hetlora"\nclients-per-round = 2\n')
    env = {**os.environ, "FEDSLM_CACHE_DIR": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-m", "fedslm.cli", "sweep", "--config",
                           str(sweep_file), "--out", str(tmp_path / "out")],
                          capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    folder = Path(done.stdout.strip().splitlines()[-1])
    rows = list(csv.DictReader(open(folder / "sweep.csv")))
    assert [r["strategy"] for r in rows] == ["fedavg", "ffa-lora", "hetlora"]
    assert all(r["run"] and not r["run"].startswith("failed") for r in rows)
    assert all(float(r["ppl_final"]) > 0 and float(r["epsilon"]) > 0 for r in rows)
    table = (folder / "sweep.md").read_text().splitlines()
    assert len(table) == 2 + 3 and "final ppl" in table[0]
    assert (folder / "report" / "tradeoff.png").is_file()

    runs = {r["strategy"]: folder / "runs" / r["run"] for r in rows}
    fed, ffa, het = (read_metrics(runs[s]) for s in ("fedavg", "ffa-lora", "hetlora"))
    # FFA-LoRA sends only B after round 0: fewer bytes up and down than FedAvg
    assert all(f["bytes_up"] < g["bytes_up"] for f, g in zip(ffa[1:], fed[1:], strict=True))
    assert all(f["bytes_down"] < g["bytes_down"] for f, g in zip(ffa[1:], fed[1:], strict=True))
    fp32 = model_mod.Quantization("none", "float32", "test")
    base, _ = model_mod.load_base(str(tiny_model), fp32, torch.device("cpu"))
    start = adapter_mod.get_adapter(adapter_mod.attach_lora(base, 4, 16.0, 0.0,
                                                            ["q_proj", "v_proj"], seed=0))
    final = load_file(runs["ffa-lora"] / "adapter" / "adapter_model.safetensors")
    assert all(np.array_equal(final[k], start[k]) for k in start if ".lora_A." in k)
    assert any(not np.array_equal(final[k], start[k]) for k in start if ".lora_B." in k)
    # HetLoRA on mixed devices: the Pi trains rank 2, the global adapter keeps rank 4
    assert all(len([c for c in line["clients"] if c["status"] == "trained"]) == 2
               for line in het[1:])  # 2 clients per round
    het_final = load_file(runs["hetlora"] / "adapter" / "adapter_model.safetensors")
    assert {v.shape[0] for k, v in het_final.items() if ".lora_A." in k} == {4}


def test_client_sampling_fixed_size_or_poisson():
    import random

    from server.nodes import sample_clients

    nodes = list(range(100))
    assert sample_clients(nodes, 0, 100, False, random.Random(0)) == (nodes, 1.0)
    # all asked, some gone: no random sampling, so no amplification (q stays 1)
    assert sample_clients(nodes[:90], 0, 100, True, random.Random(0)) == (nodes[:90], 1.0)
    chosen, q = sample_clients(nodes, 10, 100, False, random.Random(1))
    assert len(chosen) == 10 and len(set(chosen)) == 10 and q == 0.1
    sizes = [len(sample_clients(nodes, 10, 100, True, random.Random(i))[0])
             for i in range(2000)]
    assert sample_clients(nodes, 10, 100, True, random.Random(0))[1] == 0.1
    assert 9.7 < np.mean(sizes) < 10.3 and len(set(sizes)) > 5  # Binomial(100, 0.1)


def test_simulated_dropout_rate(tiny_model, text_clients, tmp_path):
    from client.rounds import simulated_dropout

    rounds = [client_settings(tiny_model, text_clients, tmp_path, dropout_rate=0.3,
                              server_round=r) for r in range(1, 2001)]
    dropped = sum(simulated_dropout(s) for s in rounds)
    assert 500 < dropped < 700
    assert not simulated_dropout(client_settings(tiny_model, text_clients, tmp_path))
