"""What the coordinator does not take on a client's word: whose privacy spend a reply
reports (the node, not the name it declares), and how far an update may move the
adapter (`max-update-norm = auto`, server/bounds.py)."""

from __future__ import annotations

import ast
import json
import logging
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from contracts import codec, wire
from contracts.config import resolve, saved_config, validate
from contracts.rundir import load_checkpoint, read_metrics, run_dirs
from privacy.audit import audit, render
from server.bounds import CODEC_SLACK, AutoNorm, adam_step_bound
from server.engine import run_federation
from server.replies import Reply
from server.spend import REGISTRY, SpendRecord, registry_path, spend_key
from server.validation import accept_updates, max_update_norm, problems_with
from tests.test_server_engine import Ledgers, run
from tests.test_server_strategies import FakeGrid, task_identity  # noqa: F401 (fixture)


def said(node: int, client: str, ledger: str, eps: float) -> Reply:
    return Reply(node=node, client=client, metrics={wire.EPSILON: eps},
                 info={wire.LEDGER_ID: ledger})


# --- whose spend a reply reports --------------------------------------------------------

def test_the_spend_key_is_the_node_in_a_deployment_and_the_name_in_a_simulation():
    reply = said(17378176666041518614, "client-0", "id", 1.0)
    assert spend_key(reply, simulation=False) == "17378176666041518614"
    assert spend_key(reply, simulation=True) == "client-0"
    assert registry_path(Path("runs"), False) == Path("runs") / REGISTRY
    assert registry_path(Path("runs"), True) != registry_path(Path("runs"), False)


def test_a_node_claiming_another_nodes_name_neither_fakes_nor_hides_its_flags():
    """Node 2 declares node 1's name "alice". Its claims (a new ledger, ε = 0) flag node 2
    alone; node 1's record is untouched, and node 1's own ledger reset is still flagged
    though node 2 reported that very ledger id and ε first."""
    record = SpendRecord()
    assert record.check([said(1, "alice", "L1", 1.0), said(2, "bob", "L2", 0.5)], "r", 1) == []

    flags = record.check([said(2, "alice", "L1-new", 0.0)], "r", 2)
    assert [(f["node"], f["client"]) for f in flags] == [(2, "alice")]
    assert record.seen["1"].ledger_id == "L1" and record.seen["1"].epsilon == 1.0
    assert record.check([said(1, "alice", "L1", 1.5)], "r", 2) == []  # node 1 is honest

    record.check([said(2, "alice", "L1-reset", 0.1)], "r", 3)
    (flag,) = record.check([said(1, "alice", "L1-reset", 0.1)], "r", 3)
    assert flag["node"] == 1 and flag["client"] == "alice"
    assert flag["problem"].startswith("new privacy ledger (id L1-reset, ε=0.1000) while this "
                                      "server saw ε=1.5000 from ledger L1 (run r round 2)")


def test_a_simulation_keys_by_name_because_its_node_ids_change_every_run(tmp_path):
    """Flower's simulation engine draws new node ids each run (checked by
    test_simulation_node_ids_change_between_runs): the registry knows a client by name."""
    path = registry_path(tmp_path, simulation=True)
    SpendRecord(True, registry=path).check([said(111, "client-0", "L0", 2.0)], "first", 1)
    again = SpendRecord(True, registry=path)
    (flag,) = again.check([said(222, "client-0", "L0-new", 0.2)], "second", 1)
    assert flag == {"client": "client-0", "node": 222, "problem": flag["problem"]}
    assert "from ledger L0 (run first round 1)" in flag["problem"]


def test_an_impersonator_in_a_real_engine_run_is_flagged_as_itself(tmp_path):
    """Node 2 says it is client-0, with a ledger of its own making every round."""
    class Impersonator(Ledgers):
        def _reply(self, msg, node, arrays, metrics, status="ok"):
            reply = super()._reply(msg, node, arrays, metrics, status)
            if node == 2:
                reply.content[wire.INFO][wire.CLIENT] = "client-0"
            return reply

    clients = Impersonator(ledger=lambda n, r: f"fake-{r}" if n == 2 else f"id-{n}",
                           epsilon=lambda n, r: 0.5 * r)
    lines = read_metrics(run(tmp_path, clients))
    flagged = [(f["node"], f["client"]) for line in lines for f in line["privacy_flags"]]
    assert flagged and set(flagged) == {(2, "client-0")}
    result = audit(tmp_path / "run")  # `fedslm audit` reads the flags as they are written
    assert [(f["round"], f["node"]) for f in result["privacy_flags"]] == [(2, 2)]
    assert "round 2: the server flagged client-0: new privacy ledger" in render(result)
    state, _ = load_checkpoint(tmp_path / "run")
    assert state["spend"]["seen"]["0"] == {"epsilon": 1.0, "ledger_id": "id-0", "run_id": "run",
                                           "round": 2, "client": "client-0"}
    registry = json.loads((tmp_path / REGISTRY).read_text())
    assert registry["key"] == "node" and set(registry["seen"]) == {"0", "1", "2"}


def test_an_older_name_keyed_registry_and_checkpoint_are_set_aside(tmp_path, caplog):
    old = {"client-0": {"epsilon": 1.0, "ledger_id": "id-0", "run_id": "old", "round": 2}}
    path = tmp_path / REGISTRY
    path.write_text(json.dumps(old))
    with caplog.at_level(logging.WARNING, logger="fedslm"):
        record = SpendRecord.from_json(old, simulation=False, registry=path)
    assert record.seen == {}
    assert json.loads((tmp_path / ".privacy-spend.old.json").read_text()) == old
    assert not path.exists()
    assert "not keyed by node" in caplog.text and "dropped" in caplog.text
    assert record.check([said(5, "client-0", "id-0", 0.0)], "new", 1) == []  # no false flag
    assert json.loads(path.read_text())["seen"]["5"]["client"] == "client-0"


def test_an_infinite_epsilon_survives_the_checkpoint_and_the_registry(tmp_path):
    """ε = ∞ (no DP, or seeded noise) is null in JSON; a resumed run reads it back."""
    path = tmp_path / REGISTRY
    first = SpendRecord(registry=path)
    first.check([said(3, "c", "L", wire.epsilon_to_wire(math.inf))], "r", 1)
    for again in (SpendRecord.from_json(json.loads(path.read_text()), False, None),
                  SpendRecord(registry=path)):
        assert again.seen["3"].epsilon == math.inf
        assert again.check([said(3, "c", "L", wire.epsilon_to_wire(math.inf))], "r", 2) == []


def test_a_resumed_run_goes_on_with_the_checkpoints_node_keyed_record(tmp_path):
    def stop_after_1(line: str) -> None:
        if line.startswith("round 1/"):
            raise KeyboardInterrupt

    honest = Ledgers(ledger=lambda n, r: f"id-{n}", epsilon=lambda n, r: 0.5 * r)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path, honest, echo=stop_after_1)
    (tmp_path / REGISTRY).unlink()  # what follows is the checkpoint's memory alone
    run_dir = tmp_path / "run"
    reset = Ledgers(ledger=lambda n, r: "new" if n == 1 else f"id-{n}",
                    epsilon=lambda n, r: 0.1 if n == 1 else 0.5 * r)
    run_federation(FakeGrid([0, 1, 2], reset), saved_config(run_dir), run_dir,
                   echo=lambda _: None)
    lines = read_metrics(run_dir)
    assert [x["round"] for x in lines] == [0, 1, 2]
    assert [(f["node"], f["client"]) for f in lines[2]["privacy_flags"]] == [(1, "client-1")]


# --- max-update-norm = auto -------------------------------------------------------------

def adamw_change(grads: torch.Tensor, lr: float, dtype=torch.float64) -> torch.Tensor:
    """The change a fresh torch AdamW (as client/trainer.py makes it) makes with these
    gradients, one row per step."""
    param = torch.nn.Parameter(torch.zeros(grads.shape[1], dtype=dtype))
    optimizer = torch.optim.AdamW([param], lr=lr, weight_decay=0.0)
    for g in grads:
        param.grad = g.to(dtype).clone()
        optimizer.step()
    return param.detach()


def adam_bound(steps: int) -> float:
    return sum(adam_step_bound(t) for t in range(1, steps + 1))


def test_the_adam_step_bound_is_one_at_the_first_step_and_grows_slowly():
    assert adam_step_bound(1) == pytest.approx(1.0, abs=1e-12)
    assert [round(adam_step_bound(t), 3) for t in (2, 6, 50)] == [1.001, 1.016, 1.614]


@pytest.mark.parametrize("steps", [1, 2, 6, 20, 50])
def test_no_gradients_move_adamw_further_than_the_bound(steps):
    """Adversarial gradient sequences against real torch AdamW: the change per coordinate
    stays within lr·Σ b_t; gradients growing by β2/β1 each step reach it (the bound is
    exact, it cannot be lowered); ordinary noisy gradients reach a good part of it."""
    lr, rng = 0.01, torch.Generator().manual_seed(steps)
    t = torch.arange(steps, dtype=torch.float64)[:, None]
    sequences = torch.cat([
        torch.ones(steps, 1),  # constant
        torch.cat([torch.full((1, 1), 1e3), torch.full((steps - 1, 1), 1e-3)]),  # big, tiny
        (0.999 / 0.9) ** t,  # Cauchy-Schwarz's equality case
        1.05 ** t, 1e6 * 0.5 ** t, 1e-6 * 3.0 ** t,
        torch.exp(4 * torch.randn(steps, 200, generator=rng, dtype=torch.float64)),
        torch.randn(steps, 200, generator=rng, dtype=torch.float64) * 1e4,
    ], dim=1)
    bound = adam_bound(steps)
    moved = adamw_change(sequences, lr).abs() / lr
    assert moved.max() <= bound
    assert moved[2] >= bound * (1 - 1e-6)
    assert (adamw_change(sequences, lr, torch.float32).abs() / lr).max() <= bound * (1 + 1e-5)


@pytest.mark.parametrize("signal, low, high", [(0.0, 0.4, 0.55), (1.0, 0.6, 0.75)])
def test_for_ordinary_gradients_the_adamw_bound_is_about_twice_the_change(signal, low, high):
    """The default 6 steps on DP-like gradients (noise, plus a steady signal of the
    noise's size or none): the update's norm is roughly half to 3/4 of the bound."""
    rng = torch.Generator().manual_seed(0)
    steps, values = 6, 20_000
    drift = torch.randn(values, generator=rng, dtype=torch.float64) * signal
    grads = drift + torch.randn(steps, values, generator=rng, dtype=torch.float64)
    ratio = float(adamw_change(grads, 0.01).norm() / (0.01 * math.sqrt(values)
                                                      * adam_bound(steps)))
    assert low < ratio < high


def test_a_dp_sgd_client_stays_within_the_sgd_bound():
    """Real Opacus DP-SGD steps on a linear model, every example drawn with a huge
    gradient (clipped to C): the change stays within the bound for the client's n and σ."""
    from opacus import GradSampleModule
    from opacus.optimizers import DPOptimizer

    torch.manual_seed(0)
    n, batch, steps, lr, clip, sigma = 40, 8, 6, 0.05, 1.0, 1.3
    model = torch.nn.Linear(30, 20, bias=False)
    start = model.weight.detach().clone()
    forward = GradSampleModule(model, batch_first=True, loss_reduction="mean")
    optimizer = DPOptimizer(torch.optim.SGD(model.parameters(), lr=lr), noise_multiplier=sigma,
                            max_grad_norm=clip, expected_batch_size=batch,
                            loss_reduction="mean")
    x = (torch.randn(1, 30) * 100).repeat(n, 1)  # every example pushes the same way
    for _ in range(steps):
        optimizer.zero_grad(set_to_none=True)
        forward(x).sum(dim=1).mean().backward()  # all n drawn, each clipped to C
        optimizer.step()
    forward._close()
    moved = float((model.weight.detach() - start).norm())
    config = validate({"optimizer": "sgd", "lr": lr, "local-steps": steps,
                       "batch-size": batch, "clip-norm": clip})
    bound = AutoNorm.from_config(config)({wire.NUM_EXAMPLES: n, wire.NOISE_MULTIPLIER: sigma},
                                         start.numel())
    assert moved <= bound
    assert moved > bound / 3


def test_sgd_without_dp_has_no_auto_bound_and_claims_are_sanitised():
    sgd = AutoNorm.from_config(validate({"optimizer": "sgd", "dp": False}))
    assert sgd({}, 100) == math.inf
    dp_sgd = AutoNorm.from_config(validate({"optimizer": "sgd"}))
    junk = {wire.NUM_EXAMPLES: math.nan, wire.NOISE_MULTIPLIER: -5.0}
    assert dp_sgd(junk, 100) == dp_sgd({}, 100) == 0.0  # an honest client reports both
    adamw = AutoNorm.from_config(validate({}))
    assert adamw({}, 100) == adamw(junk, 100) > 0  # AdamW's bound takes no claim


def test_the_codec_slack_covers_int8_rounding():
    """The decoded change of an int8-delta update is within 1.0446x the sent one's norm."""
    rng = np.random.default_rng(0)
    ref = {"w": np.zeros(128 * 40, np.float32)}
    # each block: one value at the block's max, the rest half-way between two int8 steps
    worst = np.full((40, 128), 0.5 / 127, np.float32)
    worst[:, 0] = 1.0
    for change in (worst.ravel(), rng.standard_normal(128 * 40).astype(np.float32),
                   rng.standard_cauchy(128 * 40).astype(np.float32)):
        values, scales = codec.encode({"w": change}, ref, "int8-delta")
        decoded = codec.decode(values, scales, ref)["w"]
        assert np.linalg.norm(decoded) <= CODEC_SLACK * np.linalg.norm(change)
    assert 1 + math.sqrt(codec.BLOCK) / 254 < CODEC_SLACK


def test_auto_rejects_what_no_honest_adamw_client_sends_and_says_the_bound():
    config = validate({})  # the defaults: AdamW, lr 0.01, 6 steps, max-update-norm auto
    limit = max_update_norm(config)
    assert isinstance(limit, AutoNorm)
    expected = {"m.lora_B.weight": np.zeros((64, 8), np.float32)}
    per_value = config["lr"] * adam_bound(config["local-steps"]) * CODEC_SLACK
    honest = {"m.lora_B.weight": np.full((64, 8), per_value * 0.99, np.float32)}
    poisoned = {"m.lora_B.weight": np.full((64, 8), per_value * 1.01, np.float32)}
    good = Reply(node=1, client="a", metrics={}, info={}, arrays=honest)
    bad = Reply(node=2, client="b", metrics={}, info={}, arrays=poisoned)
    failures: list = []
    assert accept_updates([good, bad], failures, lambda u: expected, 1, limit) == [good]
    (failure,) = failures
    assert failure["node"] == 2 and failure["reason"].startswith("update norm ")
    bound = per_value * math.sqrt(64 * 8)
    assert failure["reason"].endswith(f" exceeds max-update-norm auto ({bound:.4g})")
    assert max_update_norm(validate({"max-update-norm": 0})) == 0.0
    assert problems_with(poisoned, expected, 0.0) is None
    assert "exceeds max-update-norm 1" in problems_with(poisoned, expected, 1.0)


def test_auto_bounds_what_was_sent_under_hetlora():
    """P is the number of values the client sent: a rank-2 client's bound is smaller."""
    limit = AutoNorm.from_config(validate({}))
    assert limit({}, 2 * 100) == pytest.approx(limit({}, 8 * 100) / 2)


# --- real rounds (Flower's simulation engine) -------------------------------------------

SIMULATE = """
import json, sys
from contracts.environment import apply_loopback
apply_loopback()
import numpy as np
from flwr.clientapp import ClientApp
from client.app import evaluate, train
from contracts import codec
from contracts.transport import from_record, to_record
from simulations.engine import simulate

poisoned, config, measured_in = int(sys.argv[1]), json.loads(sys.argv[2]), sys.argv[3]
client_app = ClientApp()

@client_app.train()
def measured(msg, context):
    reply = train(msg, context)
    part = int(context.node_config["partition-id"])
    arrays = from_record(reply.content["arrays"])
    values, scales = codec.unpack(arrays)
    change = codec.decode(values, scales, {k: np.zeros(v.shape, np.float32)
                                           for k, v in values.items()})
    norm = float(np.sqrt(sum(np.sum(v.astype(np.float64) ** 2) for v in change.values())))
    rnd = msg.content["config"]["server-round"]
    with open(f"{measured_in}/{part}-{rnd}.json", "w") as f:  # a Ray worker's stdout is lost
        json.dump({"partition": part, "norm": norm,
                   "values": sum(v.size for v in values.values()),
                   "metrics": dict(reply.content["metrics"])}, f)
    if part == poisoned:  # scales x1000: the decoded change x1000
        arrays = {k: v * 1000 if k.endswith(codec.SCALE_SUFFIX) else v
                  for k, v in arrays.items()}
        reply.content["arrays"] = to_record(arrays)
    return reply

client_app.evaluate()(evaluate)
simulate(config, echo=print, client_app=client_app)
"""


def simulate(tmp_path: Path, poisoned: int, **config) -> tuple[list[dict], list[float]]:
    """(the run's metrics lines, each honest update's norm / its auto bound)."""
    config = {"data": config.pop("data"), "model": config.pop("model"), "num-clients": 3,
              "num-server-rounds": 1, "seq-len": 32, "batch-size": 4, "lora-r": 4,
              "max-eval-seqs": 4, "out": str(tmp_path / "runs"), **config}
    env = {**os.environ, "FEDSLM_CACHE_DIR": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1"}
    measured = tmp_path / "measured"
    measured.mkdir()
    out = subprocess.run([sys.executable, "-c", SIMULATE, str(poisoned), json.dumps(config),
                          str(measured)], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    limit = AutoNorm.from_config(resolve(flags=config))
    updates = [json.loads(p.read_text()) for p in sorted(measured.iterdir())]
    ratios = [u["norm"] / limit(u["metrics"], u["values"]) for u in updates
              if u["partition"] != poisoned]
    print("honest update norm / auto bound:", [round(r, 3) for r in ratios])
    return read_metrics(run_dirs(tmp_path / "runs")[-1]), ratios


@pytest.mark.slow
def test_a_real_round_accepts_honest_updates_and_rejects_a_poisoned_one_under_auto(
        tiny_model, text_clients, tmp_path):
    """The default config (AdamW, max-update-norm auto); client-2's update is scaled x1000."""
    lines, ratios = simulate(tmp_path, poisoned=2, model=str(tiny_model),
                             data=str(text_clients), **{"num-server-rounds": 2})
    assert len(ratios) == 4 and max(ratios) <= 1
    for line in lines[1:]:
        status = {c["client"]: c["status"] for c in line["clients"]}
        assert status["client-0"] == status["client-1"] == "trained"
        assert status["client-2"].startswith("rejected: update norm ")
        (failure,) = line["failures"]
        assert failure["client"] == "client-2"
        assert "exceeds max-update-norm auto (" in failure["reason"]


@pytest.mark.slow
def test_a_real_dp_sgd_round_accepts_every_honest_update_under_auto(tiny_model, text_clients,
                                                                    tmp_path):
    lines, ratios = simulate(tmp_path, poisoned=-1, model=str(tiny_model),
                             data=str(text_clients), optimizer="sgd")
    assert len(ratios) == 3 and max(ratios) <= 1
    assert lines[1]["failures"] == []
    assert {c["status"] for c in lines[1]["clients"]} == {"trained"}


@pytest.mark.slow
def test_simulation_node_ids_change_between_runs(tmp_path):
    """Why server/spend.py keys a simulation's record by client name."""
    script = """
from contracts.environment import apply_loopback
apply_loopback()
import time
from flwr.clientapp import ClientApp
from flwr.serverapp import ServerApp
from flwr.simulation import run_simulation

seen = []
for _ in range(2):
    app = ServerApp()

    @app.main()
    def main(grid, context):
        for _ in range(100):
            ids = sorted(grid.get_node_ids())
            if len(ids) == 2:
                break
            time.sleep(0.1)
        seen.append(ids)

    run_simulation(server_app=app, client_app=ClientApp(), num_supernodes=2,
                   backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}})
print("IDS", seen)
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1",
                                           "FEDSLM_CACHE_DIR": str(tmp_path / "cache")})
    assert out.returncode == 0, out.stderr[-3000:]
    first, second = ast.literal_eval(out.stdout.split("IDS ", 1)[1].strip())
    assert len(first) == len(second) == 2 and set(first).isdisjoint(second)


def test_a_round_row_pairs_each_nodes_evaluation_by_node_not_by_name():
    """Node 2 claims node 1's name: each row still carries its own node's evaluation."""
    from server.rows import client_rows

    info = {wire.QUANTIZATION: "none", wire.ENERGY_METHOD: "estimated:x"}
    trained = [Reply(node=n, client="alice", metrics={wire.NUM_EXAMPLES: 10}, info=info)
               for n in (1, 2)]
    evaluated = [Reply(node=n, client="alice", info=info, metrics={
        wire.EVAL_LOSS_SUM: float(n), wire.EVAL_TOKENS: 1.0}) for n in (1, 2)]
    rows = client_rows(trained, [], evaluated)
    assert sorted(row["eval_loss"] for row in rows) == [1.0, 2.0]
