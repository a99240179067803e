"""The strategy objects and the central-DP wrapper, driven as the engine drives them:
configure_* builds the messages, aggregate_* turns replies into the global adapter."""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable

import numpy as np
import pytest
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.supercore.task_identity import TaskIdentity

from contracts import adapter, wire
from contracts.rundir import SERVER_CLIENT
from contracts.transport import TransportError
from privacy.accountant import epsilon
from privacy.ledger import Ledger
from server import central_dp
from server.central_dp import CentralDP
from server.nodes import NodePool, Sampling
from server.replies import from_record, to_record
from server.strategies import STRATEGIES, FedAvg, FfaLora, HetLora

A, B = "m.lora_A.weight", "m.lora_B.weight"
Client = Callable[[Message], Message | None]


def adapter_of(a: list, b: list) -> dict[str, np.ndarray]:
    return {A: np.array(a, np.float32), B: np.array(b, np.float32)}


class FakeGrid:
    """Nodes whose replies come from `client` (None: the node does not answer)."""

    pull_interval = 0.01

    def __init__(self, nodes: list[int], client: Client | None = None) -> None:
        self.nodes, self.client, self.sent, self.replies = nodes, client, [], []

    def get_node_ids(self) -> Iterable[int]:
        return list(self.nodes)

    def push_messages(self, messages: Iterable[Message]) -> list[str]:
        messages = list(messages)
        self.sent.append(messages)
        for m in messages:
            m.metadata.__dict__["_message_id"] = m.object_id  # as a real grid does on push
            if (r := self.client(m)) is not None:
                self.replies.append(r)
        return [m.metadata.message_id for m in messages]

    def pull_messages(self, message_ids: Iterable[str]) -> list[Message]:
        ids = set(message_ids)
        out = [r for r in self.replies if r.metadata.reply_to_message_id in ids]
        self.replies = [r for r in self.replies if r not in out]
        return out


@pytest.fixture(autouse=True)
def task_identity():
    """Messages are made inside a running ServerApp; here, by the test."""
    saved = TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    yield
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved


def reply(to: Message, arrays: dict[str, np.ndarray], examples: float) -> Message:
    content = RecordDict({wire.ARRAYS: to_record(arrays),
                          wire.METRICS: MetricRecord({wire.NUM_EXAMPLES: examples})})
    return Message(content, reply_to=to)


def train_messages(strategy, arrays, nodes=(1, 2, 3)) -> list[Message]:
    grid = FakeGrid(list(nodes))
    return list(strategy.configure_train(1, to_record(arrays), ConfigRecord({"lr": 0.1}), grid))


def pool(**sampling) -> NodePool:
    return NodePool(Sampling(**{"num_clients": 3, **sampling}))


def test_the_registry_is_built_from_the_classes_and_matches_the_contract():
    assert tuple(STRATEGIES) == adapter.STRATEGIES
    assert all(cls.name == name for name, cls in STRATEGIES.items())
    assert (STRATEGIES["fedavg"], STRATEGIES["ffa-lora"], STRATEGIES["hetlora"]) == \
        (FedAvg, FfaLora, HetLora)
    with pytest.raises(ValueError, match="unknown strategy 'fedprox'"):
        type("FedProx", (FedAvg,), {"name": "fedprox"})  # the clients would not know it
    assert "fedprox" not in STRATEGIES


@pytest.mark.parametrize("cls, sent", [(FedAvg, {A, B}), (FfaLora, {B}), (HetLora, {A, B})])
def test_configure_train_sends_each_node_what_the_strategy_sends(cls, sent):
    start = adapter_of([[1, 2]], [[3], [4]])
    messages = train_messages(cls(pool()), start)
    assert [m.metadata.dst_node_id for m in messages] == [1, 2, 3]
    for m in messages:
        assert m.metadata.message_type == MessageType.TRAIN and m.metadata.group_id == "1"
        arrays = from_record(m.content[wire.ARRAYS])
        assert set(arrays) == sent
        assert all(np.array_equal(arrays[k], start[k]) for k in sent)
        assert dict(m.content[wire.CONFIG]) == {"lr": 0.1, wire.SERVER_ROUND: 1}


def test_configure_train_samples_and_configure_evaluate_takes_the_first_nodes():
    strategy = FedAvg(pool(num_clients=4, clients_per_round=2, eval_clients=3,
                           reproducible=True, seed=5))
    messages = train_messages(strategy, adapter_of([[1]], [[1]]), nodes=(7, 8, 9, 10))
    expected = sorted(random.Random("5|1").sample([7, 8, 9, 10], 2))
    assert [m.metadata.dst_node_id for m in messages] == expected
    assert strategy.sample_rate == 0.5
    grid = FakeGrid([7, 8, 9, 10])
    evaluate = list(strategy.configure_evaluate(2, ArrayRecord(), ConfigRecord(), grid))
    assert [m.metadata.dst_node_id for m in evaluate] == [7, 8, 9]
    assert {m.metadata.message_type for m in evaluate} == {MessageType.EVALUATE}
    assert all(len(m.content[wire.ARRAYS]) == 0 for m in evaluate)  # round 0: no adapter yet


def test_fedavg_aggregate_train_by_hand():
    strategy = FedAvg(pool())
    messages = train_messages(strategy, adapter_of([[0, 0]], [[0], [0]]), nodes=(1, 2))
    replies = [reply(messages[0], adapter_of([[1, 2]], [[3], [4]]), 1),
               reply(messages[1], adapter_of([[5, 6]], [[7], [8]]), 3)]  # weights 1/4, 3/4
    arrays, metrics = strategy.aggregate_train(1, replies)
    out = from_record(arrays)
    np.testing.assert_allclose(out[A], [[4, 5]])
    np.testing.assert_allclose(out[B], [[6], [7]])
    assert metrics[wire.NUM_EXAMPLES] == 4
    assert strategy.aggregate_train(2, []) == (None, None)


def test_ffa_lora_aggregate_train_averages_b_and_keeps_the_shared_a():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(2, 5)).astype(np.float32)
    bs = [rng.normal(size=(3, 2)).astype(np.float32) for _ in range(3)]
    weights = [10, 20, 70]
    strategy = FfaLora(pool())
    messages = train_messages(strategy, {A: a, B: np.zeros((3, 2), np.float32)})
    replies = [reply(m, {B: b}, w) for m, b, w in zip(messages, bs, weights, strict=True)]
    out = from_record(strategy.aggregate_train(1, replies)[0])
    assert np.array_equal(out[A], a)
    mean_update = sum(w * (b @ a) for b, w in zip(bs, weights, strict=True)) / sum(weights)
    np.testing.assert_allclose(out[B] @ a, mean_update, rtol=1e-5, atol=1e-6)


def test_hetlora_aggregate_train_of_mixed_ranks_by_hand():
    strategy = HetLora(pool())
    start = adapter_of(np.zeros((4, 2)).tolist(), np.zeros((1, 4)).tolist())
    messages = train_messages(strategy, start)
    rank4 = adapter_of([[1, 1], [2, 2], [3, 3], [4, 4]], [[1, 2, 3, 4]])
    rank2 = adapter_of([[5, 5], [6, 6]], [[5, 6]])
    rank1 = adapter_of([[9, 9]], [[9]])
    assert {k: v.shape for k, v in strategy.expected_update(rank2).items()} == \
        {A: (2, 2), B: (1, 2)}
    replies = [reply(m, u, w) for m, u, w in zip(messages, (rank4, rank2, rank1), (1, 1, 2),
                                                 strict=True)]
    out = from_record(strategy.aggregate_train(1, replies)[0])
    np.testing.assert_allclose(out[A], [[6, 6], [4, 4], [3, 3], [4, 4]])
    np.testing.assert_allclose(out[B], [[6, 4, 3, 4]])
    assert out[A].dtype == np.float32


def test_aggregate_evaluate_weights_by_tokens_and_skips_errors():
    strategy = FedAvg(pool())
    grid = FakeGrid([1, 2])
    sent = list(strategy.configure_evaluate(1, ArrayRecord(), ConfigRecord(), grid))

    def evaluated(to: Message, loss: float, tokens: int, correct: int) -> Message:
        metrics = {wire.EVAL_LOSS_SUM: loss, wire.EVAL_TOKENS: tokens, wire.EVAL_CORRECT: correct}
        return Message(RecordDict({wire.METRICS: MetricRecord(metrics)}), reply_to=to)

    out = strategy.aggregate_evaluate(1, [evaluated(sent[0], 10.0, 10, 5),
                                          evaluated(sent[1], 30.0, 30, 6)])
    assert out["eval_loss"] == 1.0 and out["token_accuracy"] == pytest.approx(11 / 40)
    assert out["perplexity"] == pytest.approx(np.e)
    assert strategy.aggregate_evaluate(1, []) is None


def central(strategy, tmp_path, **kwargs) -> CentralDP:
    options = {"noise_multiplier": 0.0, "clip_norm": 100.0, "delta": 1e-5, "num_clients": 3,
               "ledger": tmp_path / "server" / "ledger.sqlite", "run_id": "run", "seed": 7}
    return CentralDP(strategy, **{**options, **kwargs})


def test_central_dp_without_noise_is_the_mean_of_clipped_updates_over_q_n(tmp_path):
    dp = central(FedAvg(pool()), tmp_path, clip_norm=1.0)
    start = adapter_of([[0, 0]], [[0], [0]])
    messages = train_messages(dp, start)
    updates = [adapter_of([[0.3, 0]], [[0], [0.4]]),  # norm 0.5: as it is
               adapter_of([[3, 0]], [[0], [4]]),  # norm 5: clipped to 1
               adapter_of([[0, 0]], [[0], [0]])]
    replies = [reply(m, u, 100) for m, u in zip(messages, updates, strict=True)]
    out = from_record(dp.aggregate_train(1, replies)[0])
    np.testing.assert_allclose(out[A], [[(0.3 + 0.6) / 3, 0]], rtol=1e-6)  # not by weight
    np.testing.assert_allclose(out[B], [[0], [(0.4 + 0.8) / 3]], rtol=1e-6)
    assert dp.privacy_spent() == np.inf  # no noise: no privacy
    dp.close()


def test_central_dp_noise_is_seeded_per_round_and_charged_before_release(tmp_path, monkeypatch):
    dp = central(FfaLora(pool()), tmp_path, noise_multiplier=1.5, clip_norm=0.5)
    a, b = np.ones((2, 4), np.float32), np.zeros((3, 2), np.float32)
    messages = train_messages(dp, {A: a, B: b})
    charged = []
    release = central_dp.dp_fedavg

    def checked(*args, **kwargs):
        charged.append(len(Ledger(dp.ledger.path).entries()))
        return release(*args, **kwargs)

    monkeypatch.setattr(central_dp, "dp_fedavg", checked)
    out = from_record(dp.aggregate_train(4, [reply(m, {B: b}, 1) for m in messages])[0])
    assert charged == [1]  # the ledger had the entry when the aggregate was made
    noise = np.random.default_rng([7, 4]).normal(0.0, 1.5 * 0.5, size=b.shape)
    np.testing.assert_allclose(out[B], (noise / 3).astype(np.float32), rtol=1e-6)
    assert np.array_equal(out[A], a)  # FFA-LoRA: A is never sent, never noised
    [entry] = dp.ledger.entries()
    assert (entry.client, entry.round, entry.sample_rate, entry.steps) == (SERVER_CLIENT, 4, 1.0, 1)
    # the noise follows the seed: whoever knows it can remove it, so ε = ∞ (as no noise)
    assert entry.seeded and entry.noise_multiplier == 1.5
    assert entry.epsilon == dp.privacy_spent() == np.inf
    assert epsilon([entry.planned], 1e-5, "rdp", "add-remove") == \
        epsilon([(1.5, 1.0, 1)], 1e-5, "rdp", "add-remove")  # as planned with a secret seed
    assert entry.relation == "add-remove"  # user level: a whole client added or removed
    dp.close()


def test_an_empty_poisson_draw_still_releases_the_noised_aggregate(tmp_path):
    seed = next(s for s in range(100) if random.Random(f"{s}|1").random() >= 0.1)
    sampling = {"num_clients": 10, "clients_per_round": 1, "poisson": True,
                "reproducible": True, "seed": seed}
    dp = central(FedAvg(pool(**sampling)), tmp_path, noise_multiplier=1.0, clip_norm=1.0,
                 num_clients=10, seed=seed)
    start = adapter_of([[1, 2]], [[3], [4]])
    assert train_messages(dp, start, nodes=(1,)) == []
    out = from_record(dp.aggregate_train(1, [])[0])
    rng = np.random.default_rng([seed, 1])
    for key in (A, B):  # noise over q·N = 1 expected client
        np.testing.assert_allclose(out[key], start[key] + rng.normal(0.0, 1.0, start[key].shape),
                                   rtol=1e-6)
    assert dp.ledger.entries()[0].sample_rate == 0.1
    dp.close()


def test_the_wrapper_delegates_what_it_does_not_change(tmp_path):
    inner = HetLora(pool())
    dp = central(inner, tmp_path)
    messages = train_messages(dp, adapter_of([[1, 1], [2, 2]], [[1, 2]]))
    assert len(messages) == 3 and inner.current
    assert dp.expected_update(adapter_of([[1, 1]], [[1]]))[A].shape == (1, 2)
    grid = FakeGrid([1])
    assert len(list(dp.configure_evaluate(1, ArrayRecord(), ConfigRecord(), grid))) == 1
    assert dp.privacy_spent() == 0.0 and inner.privacy_spent() is None
    dp.close()


def test_to_record_and_back_is_exact():
    rng = np.random.default_rng(0)
    arrays = {"x": rng.normal(size=(3, 5)).astype(np.float32),
              "y": rng.integers(-127, 127, size=(4, 2)).astype(np.int8),
              "y#scale": np.ones(4, np.float32)}
    record = to_record(arrays)
    assert list(record) == ["safetensors"]  # one object per message for the SuperLink
    back = from_record(record)
    assert set(back) == set(arrays)
    assert all(back[k].dtype == v.dtype and np.array_equal(back[k], v) for k, v in arrays.items())
    per_tensor = from_record(ArrayRecord({k: Array(v) for k, v in arrays.items()}))
    assert all(np.array_equal(per_tensor[k], v) for k, v in arrays.items())
    assert to_record({}) == ArrayRecord() and from_record(None) == {}


def test_a_garbled_packed_record_is_a_clear_error():
    record = ArrayRecord({"safetensors": Array(np.arange(40, dtype=np.uint8))})
    with pytest.raises(TransportError, match="packed adapter record is unreadable"):
        from_record(record)
