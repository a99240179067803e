"""The round engine on fake nodes (no Ray, no model): the metric rows, what is sent,
skipped rounds, the budget stop, failures, central DP and resume."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ConfigRecord, Error, Message, MessageType, MetricRecord, RecordDict
from safetensors.numpy import load_file

from contracts import codec, wire
from contracts.config import SCHEMA, SERVER, saved_config, validate
from contracts.errors import RunFailed
from contracts.rundir import load_checkpoint, read_metrics, server_ledger
from privacy.ledger import Ledger
from server.engine import FederationError, TooFewUpdates, run_federation
from server.replies import from_record, to_record
from tests.test_server_strategies import FakeGrid, task_identity  # noqa: F401 (fixture)

A, B = "m.lora_A.weight", "m.lora_B.weight"
START = {A: np.full((2, 4), 0.5, np.float32), B: np.zeros((4, 2), np.float32)}
ROUND_LINE = {"round", "eval_loss", "perplexity", "token_accuracy", "epsilon", "delta",
              "central_epsilon", "round_seconds", "bytes_up", "bytes_down", "clients",
              "dropouts", "failures", "skipped", "energy_j", "loss_drop_per_kj",
              "privacy_flags"}
CLIENT_ROW = {"client", "node", "status", "epsilon", "delta", "budget_epsilon", "num_examples",
              "train_seconds", "eval_seconds", "noise_multiplier", "sample_rate", "steps",
              "energy_j", "energy_method", "peak_rss_mb", "bytes_up", "eval_loss",
              "quantization", "bytes_down", "samples_per_second", "stats_released"}


class Clients:
    """Node n is client-<n>: it trains by adding 0.01·(n+1)·round to what it got, on
    10·(n+1) examples. `refuse`, `fail`, `silent`, `nan`: nodes that do so in training."""

    def __init__(self, encoding: str = "float32", **behaviour: set[int]) -> None:
        self.encoding, self.behaviour, self.configs = encoding, behaviour, []

    def __call__(self, msg: Message) -> Message | None:
        node, config = msg.metadata.dst_node_id, dict(msg.content[wire.CONFIG])
        self.configs.append(config)
        rnd, received = config[wire.SERVER_ROUND], from_record(msg.content[wire.ARRAYS])
        if msg.metadata.message_type == MessageType.EVALUATE:
            return self._evaluated(msg, node, rnd)
        if node in self.behaviour.get("silent", ()):
            return None
        if node in self.behaviour.get("fail", ()):
            return Message(error=Error(code=0, reason="device failed"), reply_to=msg)
        if node in self.behaviour.get("refuse", ()):
            return self._reply(msg, node, {}, {}, "refused: budget exhausted")
        update = {k: v + np.float32(0.01 * (node + 1) * rnd) for k, v in received.items()}
        if node in self.behaviour.get("nan", ()):
            update = {k: np.full_like(v, np.nan) for k, v in update.items()}
        values, scales = codec.encode(update, received, self.encoding)
        metrics = {wire.EPSILON: 0.5 * rnd, wire.DELTA: 1e-5, wire.NUM_EXAMPLES: 10 * (node + 1),
                   wire.TRAIN_SECONDS: 2.0, wire.STEPS: 3, wire.ENERGY_J: 5.0}
        return self._reply(msg, node, codec.pack(values, scales), metrics)

    def _evaluated(self, msg: Message, node: int, rnd: int) -> Message:
        metrics = {wire.EVAL_LOSS_SUM: 30.0 / (rnd + 1), wire.EVAL_TOKENS: 10,
                   wire.EVAL_CORRECT: 4 + rnd, wire.EVAL_SECONDS: 1.0, wire.ENERGY_J: 1.0}
        return self._reply(msg, node, START if rnd == 0 else {}, metrics)

    def _reply(self, msg: Message, node: int, arrays: dict, metrics: dict,
               status: str = "ok") -> Message:
        info = {wire.CLIENT: f"client-{node}", wire.STATUS: status, wire.QUANTIZATION: "none",
                wire.ENERGY_METHOD: "model", wire.ADAPTER_CONFIG: "{}"}
        content = RecordDict({wire.METRICS: MetricRecord(metrics), wire.INFO: ConfigRecord(info)})
        if arrays:
            content[wire.ARRAYS] = to_record(arrays)
        return Message(content, reply_to=msg)


def run(tmp_path: Path, clients: Clients, nodes: int = 3, echo=None, **config) -> Path:
    # the fake clients' increments are no optimizer's: no norm bound (tests/test_server_trust.py)
    config = validate({"num-clients": nodes, "num-server-rounds": 2, "node-wait": 1.0,
                       "round-timeout": 5.0, "update-encoding": clients.encoding,
                       "max-update-norm": 0.0, **config})
    run_dir = tmp_path / "run"
    run_dir.mkdir(parents=True, exist_ok=True)
    lines = []
    run_federation(FakeGrid(list(range(nodes)), clients), config, run_dir,
                   echo=echo or lines.append)
    return run_dir


def fedavg_of_increments(rounds: int, nodes: int = 3) -> dict[str, np.ndarray]:
    out = {k: v.astype(np.float64) for k, v in START.items()}
    weights = [10 * (n + 1) for n in range(nodes)]
    for rnd in range(1, rounds + 1):
        step = sum(w * 0.01 * (n + 1) * rnd for n, w in enumerate(weights)) / sum(weights)
        out = {k: v + step for k, v in out.items()}
    return out


@pytest.mark.parametrize("encoding", ["float32", "int8-delta"])
def test_rounds_on_fake_nodes_write_the_rows_and_the_averaged_adapter(tmp_path, encoding):
    run_dir = run(tmp_path, Clients(encoding))
    lines = read_metrics(run_dir, check=True)
    assert [line["round"] for line in lines] == [0, 1, 2]
    assert all(set(line) == ROUND_LINE for line in lines)
    assert all(set(row) == CLIENT_ROW for line in lines for row in line["clients"])
    assert [row["status"] for row in lines[0]["clients"]] == ["evaluated"] * 3
    assert [row["status"] for row in lines[2]["clients"]] == ["trained"] * 3
    assert lines[0]["eval_loss"] == 3.0 and lines[2]["eval_loss"] == 1.0
    assert lines[2]["epsilon"] == 1.0 and lines[2]["central_epsilon"] is None
    assert lines[1]["energy_j"] == 3 * (5.0 + 1.0)
    assert lines[2]["loss_drop_per_kj"] == pytest.approx((3.0 - 1.0) / (39 / 1e3))
    assert lines[1]["clients"][0]["samples_per_second"] == 3 * 16 / 2.0
    adapter = load_file(run_dir / "adapter" / "adapter_model.safetensors")
    tolerance = 1e-6 if encoding == "float32" else 2e-4
    for key, value in fedavg_of_increments(2).items():
        np.testing.assert_allclose(adapter[key], value, atol=tolerance)
    state, arrays = load_checkpoint(run_dir)
    assert state["round"] == 2 and all(np.array_equal(arrays[k], adapter[k]) for k in adapter)


def test_every_key_a_client_reads_is_sent_and_no_server_key(tmp_path):
    clients = Clients()
    run_dir = run(tmp_path, clients, **{"num-server-rounds": 1, "state-root": ""})
    for config in clients.configs:
        sent = set(config)
        assert {k for k, key in SCHEMA.items() if key.scope in ("client", "node")} <= sent
        assert not {k for k, key in SCHEMA.items() if key.scope == SERVER} & sent
        assert config["run-id"] == run_dir.name
        assert config["state-root"] == str(run_dir / "clients")
    assert sorted({c[wire.SERVER_ROUND] for c in clients.configs}) == [0, 1]
    saved = json.loads((run_dir / "config.json").read_text())
    assert saved["run-id"] == run_dir.name and saved["run-dir"] == str(run_dir)


def test_a_round_with_too_few_usable_updates_is_skipped(tmp_path):
    run_dir = run(tmp_path, Clients(nan={1}), nodes=2, **{"min-replies": 2})
    line = read_metrics(run_dir)[1]
    assert "1 usable updates, fewer than min-replies=2" in line["skipped"]
    status = {row["client"]: row["status"] for row in line["clients"]}
    assert status["client-0"] == "unused: round skipped"
    assert status["client-1"] == f"rejected: {A} holds NaN or Inf"
    assert [f["node"] for f in line["failures"]] == [1]
    _, arrays = load_checkpoint(run_dir)
    assert all(np.array_equal(arrays[k], START[k]) for k in START)  # the adapter stayed


def test_refusals_failures_and_silence_are_recorded_and_the_rest_aggregated(tmp_path):
    run_dir = run(tmp_path, Clients(refuse={0}, fail={1}, silent={2}), nodes=4,
                  **{"num-server-rounds": 1})
    line = read_metrics(run_dir)[1]
    assert line["dropouts"] == [{"client": "client-0", "reason": "refused: budget exhausted"}]
    assert line["failures"] == [{"node": 1, "reason": "device failed"},
                                {"node": 2, "reason": "no reply within 5s"}]
    status = {row["client"]: row["status"] for row in line["clients"]}
    assert status == {"client-0": "refused: budget exhausted", "client-3": "trained"}
    adapter = load_file(run_dir / "adapter" / "adapter_model.safetensors")
    np.testing.assert_allclose(adapter[B], START[B] + 0.04, rtol=1e-6)


def test_the_run_stops_when_every_clients_budget_is_spent(tmp_path):
    said: list[str] = []
    run_dir = run(tmp_path, Clients(refuse={0, 1}), nodes=2, echo=said.append)
    assert "round 1: every client's privacy budget is spent; stopping" in said
    assert [line["round"] for line in read_metrics(run_dir)] == [0]


def test_clients_that_start_from_different_adapters_stop_the_run(tmp_path):
    class Different(Clients):
        def _evaluated(self, msg, node, rnd):
            reply = super()._evaluated(msg, node, rnd)
            if node == 1:
                reply.content[wire.ARRAYS] = to_record({k: v + 1 for k, v in START.items()})
            return reply

    with pytest.raises(FederationError, match="start from different adapters"):
        run(tmp_path, Different(), nodes=2)


def test_central_dp_over_ffa_lora_charges_each_round_and_keeps_a(tmp_path):
    run_dir = run(tmp_path, Clients(), **{"strategy": "ffa-lora", "central-dp": True})
    lines = read_metrics(run_dir)
    assert lines[0]["central_epsilon"] == 0.0
    assert 0 < lines[1]["central_epsilon"] < lines[2]["central_epsilon"]
    entries = Ledger(server_ledger(run_dir)).entries()
    assert [e.round for e in entries] == [1, 2]
    assert entries[-1].epsilon == lines[2]["central_epsilon"]
    adapter = load_file(run_dir / "adapter" / "adapter_model.safetensors")
    assert np.array_equal(adapter[A], START[A])


def test_seeded_central_noise_is_recorded_as_no_noise(tmp_path):
    """reproducible: the server's noise follows the seed in config.json, so ε = ∞."""
    run_dir = run(tmp_path, Clients(), **{"central-dp": True, "reproducible": True})
    assert [line["central_epsilon"] for line in read_metrics(run_dir)] == [0.0, None, None]
    entries = Ledger(server_ledger(run_dir)).entries()
    assert all(e.seeded and e.epsilon == float("inf") for e in entries)


def test_a_stopped_run_resumes_to_the_same_result(tmp_path):
    whole = run(tmp_path / "whole", Clients(), **{"num-server-rounds": 3})

    def stop_after_1(line: str) -> None:
        if line.startswith("round 1/"):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "parts", Clients(), echo=stop_after_1, **{"num-server-rounds": 3})
    parts = tmp_path / "parts" / "run"
    said: list[str] = []
    run_federation(FakeGrid([0, 1, 2], Clients()), saved_config(parts), parts, said.append)
    assert said[0] == "resuming run run after round 1"
    assert [x["round"] for x in read_metrics(parts)] == [0, 1, 2, 3]
    for a, b in zip(read_metrics(whole), read_metrics(parts), strict=True):
        assert a["eval_loss"] == b["eval_loss"] and a["epsilon"] == b["epsilon"]
    final = [load_file(d / "adapter" / "adapter_model.safetensors") for d in (whole, parts)]
    assert all(np.array_equal(final[0][k], final[1][k]) for k in final[0])


def test_the_errors_are_run_failures_importable_where_the_cli_looks():
    from server import app

    assert app.FederationError is FederationError and app.TooFewUpdates is TooFewUpdates
    assert issubclass(TooFewUpdates, FederationError) and issubclass(FederationError, RunFailed)
    assert FederationError.exit_code == 1


def test_the_server_imports_nothing_of_the_client_or_the_simulations():
    for path in Path("server").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            assert not [n for n in names if n.split(".")[0] in ("client", "simulations")], path


def test_nothing_in_the_server_branches_on_a_strategy_name_outside_strategies():
    for path in Path("server").glob("*.py"):
        if path.name != "strategies.py":
            text = path.read_text()
            assert not [s for s in ('"fedavg"', '"ffa-lora"', '"hetlora"') if s in text], path


class Ledgers(Clients):
    """Clients that report a ledger id and a cumulative ε of their own."""

    def __init__(self, ledger, epsilon) -> None:
        super().__init__()
        self.ledger, self.epsilon = ledger, epsilon  # (node, round) -> id / ε

    def _reply(self, msg, node, arrays, metrics, status="ok"):
        rnd = dict(msg.content[wire.CONFIG])[wire.SERVER_ROUND]
        reply = super()._reply(msg, node, arrays, metrics, status)
        reply.content[wire.INFO][wire.LEDGER_ID] = self.ledger(node, rnd)
        reply.content[wire.METRICS][wire.EPSILON] = self.epsilon(node, rnd)
        return reply


def test_a_replaced_ledger_and_a_falling_epsilon_are_flagged(tmp_path):
    """Node 1's ledger is deleted after round 1 (a new id, ε from 0 again); node 2 reports
    less ε than before with the same ledger. Node 0 is honest."""
    clients = Ledgers(ledger=lambda n, r: f"id-{n}-new" if n == 1 and r >= 2 else f"id-{n}",
                      epsilon=lambda n, r: 0.2 if n == 1 and r >= 2 else
                      (0.1 if n == 2 and r >= 2 else 0.5 * r))
    said: list[str] = []
    run_dir = run(tmp_path, clients, echo=said.append)
    lines = read_metrics(run_dir)
    assert lines[1]["privacy_flags"] == []
    flags = {f["client"]: f["problem"] for f in lines[2]["privacy_flags"]}
    assert set(flags) == {"client-1", "client-2"}
    assert flags["client-1"].startswith("new privacy ledger (id id-1-new, ε=0.2000) while "
                                        "this server saw ε=0.5000 from ledger id-1")
    assert flags["client-2"].startswith("cumulative ε went down from 0.5000")
    assert "PRIVACY FLAGS: 2" in said[-1]
    state, _ = load_checkpoint(run_dir)
    assert state["spend"]["key"] == "node"
    assert state["spend"]["seen"]["1"] == {"epsilon": 0.2, "ledger_id": "id-1-new",
                                           "run_id": "run", "round": 2,
                                           "client": "client-1"}  # kept for a resume


def test_the_server_remembers_spend_across_runs(tmp_path):
    """A deployment's next run: node 0 comes back with a new ledger at ε=0."""
    run(tmp_path, Ledgers(ledger=lambda n, r: f"id-{n}", epsilon=lambda n, r: 0.5 * r))
    registry = json.loads((tmp_path / ".privacy-spend.json").read_text())
    assert registry["key"] == "node" and registry["seen"]["0"]["epsilon"] == 1.0
    (tmp_path / "run").rename(tmp_path / "first")
    again = Ledgers(ledger=lambda n, r: "fresh" if n == 0 else f"id-{n}",
                    epsilon=lambda n, r: 1.0 + 0.5 * r if n else 0.5 * r)
    lines = read_metrics(run(tmp_path, again, **{"num-server-rounds": 1}))
    assert [f["client"] for f in lines[0]["privacy_flags"]] == ["client-0"]
    assert "from ledger id-0 (run run round 2)" in lines[0]["privacy_flags"][0]["problem"]


def test_a_simulation_with_ledgers_in_the_run_keeps_no_registry(tmp_path):
    config = validate({"num-clients": 2, "num-server-rounds": 1, "node-wait": 1.0,
                       "round-timeout": 5.0})
    clients = Ledgers(ledger=lambda n, r: f"id-{n}", epsilon=lambda n, r: 0.5 * r)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    run_federation(FakeGrid([0, 1], clients), config, run_dir, echo=lambda _: None,
                   simulation=True)
    assert not (tmp_path / ".privacy-spend.json").exists()
    assert json.loads((run_dir / "config.json").read_text())["ledgers"] == "local"


def test_a_client_without_its_ledger_is_flagged_at_once(tmp_path):
    """Round 0's evaluation already tells: a client the server saw spend now has none."""
    run(tmp_path, Ledgers(ledger=lambda n, r: f"id-{n}", epsilon=lambda n, r: 0.5 * r))
    (tmp_path / "run").rename(tmp_path / "first")
    gone = Ledgers(ledger=lambda n, r: "" if n == 2 and r == 0 else f"id-{n}",
                   epsilon=lambda n, r: 0.0 if n == 2 and r == 0 else 1.0 + 0.5 * r)
    lines = read_metrics(run(tmp_path, gone, **{"num-server-rounds": 1}))
    (flag,) = lines[0]["privacy_flags"]
    assert flag["client"] == "client-2"
    assert flag["problem"].startswith("no privacy ledger while this server saw ε=1.0000")
