import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from common.config import RunConfig
from server.strategies import FedAvgLoRA, FedProxLoRA, build_strategy, message_bytes


class FakeGrid:
    """Just enough of a Grid for configure_train: a fixed set of node ids."""

    def __init__(self, nodes):
        self.nodes = nodes

    def get_node_ids(self):
        return self.nodes


def _reply(to: Message, weights: dict, num_examples: int, loss: float) -> Message:
    content = RecordDict({
        "arrays": ArrayRecord({k: torch.tensor(v, dtype=torch.float32) for k, v in weights.items()}),
        "metrics": MetricRecord({"train-loss": loss, "num-examples": num_examples}),
    })
    return Message(content=content, reply_to=to)


def test_fedavg_weights_by_examples_like_a_hand_computation(flower_identity):
    strategy = build_strategy(RunConfig(num_clients=2, min_train_clients=2))
    assert isinstance(strategy, FedAvgLoRA)
    initial = ArrayRecord({"w": torch.zeros(2, 2)})
    sent = list(strategy.configure_train(1, initial, ConfigRecord(), FakeGrid([11, 22])))
    assert len(sent) == 2
    assert strategy.traffic.bytes_sent == sum(message_bytes(m) for m in sent)
    a, b = np.full((2, 2), 1.0), np.array([[3.0, -1.0], [0.5, 2.0]])
    replies = [_reply(sent[0], {"w": a}, 30, 1.0), _reply(sent[1], {"w": b}, 10, 3.0)]
    arrays, metrics = strategy.aggregate_train(1, replies)
    expected = (30 * a + 10 * b) / 40
    np.testing.assert_allclose(arrays["w"].numpy(), expected, rtol=1e-6)
    assert metrics["train-loss"] == pytest.approx((30 * 1.0 + 10 * 3.0) / 40)
    assert strategy.traffic.replies == 2
    assert strategy.traffic.bytes_received == sum(message_bytes(r) for r in replies)


def test_message_bytes_count_what_flower_serializes(flower_identity):
    """At least the tensor data, and identical chunks once, as Flower pushes them."""
    from flwr.app.message_type import MessageType

    def message(arrays):
        return Message(RecordDict({"arrays": ArrayRecord(arrays)}), dst_node_id=1,
                       message_type=MessageType.TRAIN)

    random = message({"a": torch.randn(64, 64), "b": torch.randn(64, 64)})
    zeros = message({"a": torch.zeros(64, 64), "b": torch.zeros(64, 64)})
    assert 2 * 64 * 64 * 4 < message_bytes(random) < 1.05 * 2 * 64 * 64 * 4
    assert message_bytes(zeros) < 0.55 * message_bytes(random)  # one chunk for both


def test_fedprox_sends_mu_to_clients(flower_identity):
    strategy = build_strategy(RunConfig(strategy="fedprox", proximal_mu=0.25, num_clients=2))
    assert isinstance(strategy, FedProxLoRA)
    initial = ArrayRecord({"w": torch.zeros(3)})
    sent = list(strategy.configure_train(2, initial, ConfigRecord(), FakeGrid([1, 2])))
    assert all(m.content["config"]["proximal-mu"] == 0.25 for m in sent)
    assert all(m.content["config"]["server-round"] == 2 for m in sent)


def _one_round(strategy, start, client_weights):
    initial = ArrayRecord({"w": torch.tensor(start, dtype=torch.float32)})
    sent = list(strategy.configure_train(1, initial, ConfigRecord(), FakeGrid([1, 2])))
    replies = [_reply(m, {"w": w}, 10, 1.0) for m, w in zip(sent, client_weights)]
    arrays, _ = strategy.aggregate_train(1, replies)
    # the next round sends this on: it must keep the dtype (FedOpt computes in float64)
    assert arrays["w"].dtype == initial["w"].dtype
    return arrays["w"].numpy()


def test_reptile_steps_epsilon_toward_the_client_average(flower_identity):
    start, clients = [1.0, -2.0], [[3.0, 0.0], [5.0, 2.0]]
    avg = np.mean(clients, axis=0)
    for epsilon in (0.25, 1.0):
        cfg = RunConfig(strategy="reptile", reptile_epsilon=epsilon, num_clients=2)
        got = _one_round(build_strategy(cfg), start, clients)
        np.testing.assert_allclose(got, np.array(start) + epsilon * (avg - start), rtol=1e-6)
    fedavg = _one_round(build_strategy(RunConfig(num_clients=2)), start, clients)
    np.testing.assert_allclose(fedavg, avg, rtol=1e-6)  # epsilon = 1 is FedAvg


@pytest.mark.parametrize("name", ["fedadam", "fedyogi", "fedadagrad", "fedavgm"])
def test_adaptive_strategies_move_toward_the_clients_and_take_their_settings(name, flower_identity):
    cfg = RunConfig(strategy=name, server_eta=0.01, server_lr=0.5, num_clients=2)
    strategy = build_strategy(cfg)
    if name == "fedavgm":
        assert strategy.server_learning_rate == 0.5 and strategy.server_momentum == 0.9
    else:
        assert strategy.eta == 0.01 and strategy.tau == cfg.server_tau
    start = np.zeros(3, dtype=np.float32)
    got = _one_round(strategy, start, [[1.0, 1.0, -1.0], [1.0, 3.0, -1.0]])
    assert np.all(np.sign(got) == np.array([1, 1, -1]))  # a step in the clients' direction
    if name != "fedavgm":  # adaptive steps are about eta per coordinate, whatever the scale
        assert np.all(np.abs(got) <= 0.01 * 1.01 * 10)


def test_server_beta1_defaults_per_strategy_and_an_explicit_value_wins(flower_identity):
    # -1 (the default): FedAdam without server momentum (docs/control.md's sweep), FedYogi
    # with Flower's 0.9 (no bias correction: at 0 its first steps are ~eta/tau x update)
    assert build_strategy(RunConfig(strategy="fedadam", num_clients=2)).beta_1 == 0.0
    assert build_strategy(RunConfig(strategy="fedyogi", num_clients=2)).beta_1 == 0.9
    cfg = RunConfig(strategy="fedadam", server_beta1=0.9, num_clients=2)
    assert build_strategy(cfg).beta_1 == 0.9
    # recorded as the number used: config.json (and a resume) never holds -1
    assert RunConfig(strategy="fedadam").to_mapping()["server-beta1"] == 0.0
    assert RunConfig.from_mapping({"strategy": "fedyogi"}).server_beta1 == 0.9
    for bad in (-0.5, 1.0, 2.0):  # 1: Adam's bias correction would divide by zero
        with pytest.raises(ValueError, match="'server-beta1' must be in"):
            RunConfig(server_beta1=bad)
    with pytest.raises(ValueError, match="'server-beta2' must be in"):
        RunConfig(server_beta2=1.0)


def test_fedadam_default_step_matches_adam_without_momentum_by_hand(flower_identity):
    """Round 1 of Flower's FedAdam at beta1 0: m = delta, v = (1 - beta2) delta^2, and
    eta scaled by sqrt(1 - beta2^2) (Flower's bias correction counts round r as r + 1)."""
    cfg = RunConfig(strategy="fedadam", num_clients=2)
    start = np.zeros(3, dtype=np.float32)
    clients = [[1e-3, 2e-3, -1e-3], [3e-3, 2e-3, -1e-3]]
    got = _one_round(build_strategy(cfg), start, clients)
    delta = np.mean(clients, axis=0)
    beta2, tau, eta = cfg.server_beta2, cfg.server_tau, cfg.server_eta
    expected = eta * np.sqrt(1 - beta2 ** 2) * delta / (np.sqrt((1 - beta2) * delta ** 2) + tau)
    np.testing.assert_allclose(got, expected, rtol=1e-5)


def test_train_metrics_combine_by_meaning_not_by_blind_averaging():
    from server.strategies import train_metrics

    records = [RecordDict({"metrics": MetricRecord({
        "train-loss": loss, "num-examples": n, "train-tokens": tokens, "train-seconds": secs,
        "partition-id": pid, "unit-weight": 1})})
        for loss, n, tokens, secs, pid in ((2.0, 30, 100, 4.0, 0), (4.0, 10, 50, 9.0, 3))]
    got = dict(train_metrics(records, "num-examples"))
    # weighted mean loss (2*30 + 4*10) / 40; ids and flags are not averaged at all
    assert got == {"num-examples": 40, "train-loss": pytest.approx(2.5), "train-tokens": 150,
                   "train-seconds": 9.0}
