"""Faults and attacks: replies the server must reject, robust aggregators against one
hostile client, and a real simulation in which one client crashes every round."""

import json

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict

from common.config import RunConfig
from server.strategies import build_strategy
from server.validation import REASONS
from tests.test_cli import fedtune
from tests.test_strategies import FakeGrid

SHAPES = {"a": (4, 3), "b": (5,)}
HOSTILE = 99  # node id of the attacker in every round below


def _initial() -> ArrayRecord:
    return ArrayRecord({k: torch.zeros(s) for k, s in SHAPES.items()})


def _honest(seed: int) -> dict:
    """An honest update: the common direction (all ones) plus a little noise."""
    rng = np.random.default_rng(seed)
    return {k: torch.tensor(1.0 + 0.02 * rng.standard_normal(s), dtype=torch.float32)
            for k, s in SHAPES.items()}


def _reply(to: Message, arrays: dict, num_examples=10, **extra_metrics) -> Message:
    metrics = {"train-loss": 1.0, "num-examples": num_examples, **extra_metrics}
    content = RecordDict({"arrays": ArrayRecord(arrays), "metrics": MetricRecord(metrics)})
    return Message(content=content, reply_to=to)


def _flat(arrays) -> np.ndarray:
    return np.concatenate([arrays[k].numpy().ravel() for k in SHAPES])


def _run_round(cfg: RunConfig, num_honest: int, hostile: dict | None):
    """One configure/aggregate round: honest replies from nodes 1..n, then the hostile
    one (if any) from node HOSTILE. Returns the strategy, its result, the honest mean."""
    strategy = build_strategy(cfg)
    nodes = list(range(1, num_honest + 1)) + ([HOSTILE] if hostile is not None else [])
    sent = list(strategy.configure_train(1, _initial(), ConfigRecord(), FakeGrid(nodes)))
    sent.sort(key=lambda m: m.metadata.dst_node_id)  # Flower samples in random order
    honest = [_honest(seed) for seed in range(num_honest)]
    replies = [_reply(m, honest[i]) for i, m in enumerate(sent[:num_honest])]
    if hostile is not None:
        replies.append(_reply(sent[-1], **hostile))
    arrays, _ = strategy.aggregate_train(1, replies)
    return strategy, arrays, np.mean([_flat(h) for h in honest], axis=0)


def _bad(**changes) -> dict:
    arrays = _honest(seed=123)
    arrays.update(changes)
    return {"arrays": {k: v for k, v in arrays.items() if v is not None}}


@pytest.mark.parametrize("reason, hostile", [
    ("names", _bad(c=torch.ones(2))),
    ("names", _bad(b=None)),
    ("shape", _bad(a=torch.ones(3, 4))),
    ("dtype", _bad(a=torch.ones(4, 3, dtype=torch.float64))),
    ("non-finite", _bad(a=torch.full((4, 3), float("nan")))),
    ("non-finite", _bad(b=torch.tensor([1.0, 1.0, float("inf"), 1.0, 1.0]))),
    ("num-examples", {**_bad(), "num_examples": 0}),
    ("num-examples", {**_bad(), "num_examples": -5}),
    ("num-examples", {**_bad(), "num_examples": 2.5}),
    ("num-examples", {**_bad(), "num_examples": 10**9}),  # above max-num-examples
    ("norm", {"arrays": {k: v * 100 for k, v in _honest(seed=7).items()}}),
    ("malformed", {**_bad(), "extra": 1.0}),  # metric keys unlike the others'
], ids=lambda v: v if isinstance(v, str) else "")
def test_each_bad_reply_is_rejected_and_counted(flower_identity, caplog, reason, hostile):
    cfg = RunConfig(num_clients=5, min_train_clients=2)
    strategy, arrays, honest_mean = _run_round(cfg, 4, hostile)
    assert strategy.traffic.rejected == {r: int(r == reason) for r in REASONS}
    assert strategy.traffic.replies == 4 and strategy.traffic.aggregated
    # the aggregate is exactly the honest FedAvg (equal weights: the plain mean)
    np.testing.assert_allclose(_flat(arrays), honest_mean, rtol=1e-5)
    assert f"rejected the reply of node {HOSTILE} ({reason})" in caplog.text


def test_reply_without_a_metric_record_is_malformed(flower_identity):
    strategy = build_strategy(RunConfig(num_clients=3, min_train_clients=2))
    sent = list(strategy.configure_train(1, _initial(), ConfigRecord(), FakeGrid([1, 2, 3])))
    replies = [_reply(m, _honest(i)) for i, m in enumerate(sent[:2])]
    replies.append(Message(RecordDict({"arrays": ArrayRecord(_honest(5))}), reply_to=sent[2]))
    arrays, _ = strategy.aggregate_train(1, replies)
    assert strategy.traffic.rejected["malformed"] == 1 and arrays is not None


def test_error_replies_are_failures_and_the_round_goes_on(flower_identity):
    strategy = build_strategy(RunConfig(num_clients=3, min_train_clients=2))
    sent = list(strategy.configure_train(1, _initial(), ConfigRecord(), FakeGrid([1, 2, 3])))
    replies = [_reply(m, _honest(i)) for i, m in enumerate(sent[:2])]
    replies.append(Message(Error(code=0, reason="client crashed"), reply_to=sent[2]))
    arrays, _ = strategy.aggregate_train(1, replies)
    assert arrays is not None
    assert (strategy.traffic.failures, strategy.traffic.replies) == (1, 2)
    assert sum(strategy.traffic.rejected.values()) == 0


class EchoGrid(FakeGrid):
    """A Grid whose nodes answer every train message with ``answer(message)``."""

    def __init__(self, nodes, answer):
        super().__init__(nodes)
        self.answer = answer

    def send_and_receive(self, messages, timeout=None):
        return [self.answer(m) for m in messages]


def test_too_few_valid_replies_keep_the_global_adapter(flower_identity, caplog):
    """Through Flower's own Strategy.start: no aggregate, so the old arrays stay."""
    strategy = build_strategy(RunConfig(num_clients=3, min_train_clients=3))
    nan = {k: torch.full(s, float("nan")) for k, s in SHAPES.items()}
    answer = lambda m: _reply(m, nan if m.metadata.dst_node_id == 3 else _honest(0))  # noqa: E731
    seen = {}

    def evaluate_fn(server_round, arrays):
        seen[server_round] = _flat(arrays)

    strategy.start(grid=EchoGrid([1, 2, 3], answer), initial_arrays=_initial(), num_rounds=1,
                   evaluate_fn=evaluate_fn)
    assert not strategy.traffic.aggregated and strategy.traffic.rejected["non-finite"] == 1
    np.testing.assert_array_equal(seen[1], np.zeros_like(seen[1]))
    assert "fewer than 'min-train-clients' 3: the global adapter stays as it was" in caplog.text


ATTACKS = {
    "scaled-x100": lambda h: {k: v * 100 for k, v in h.items()},
    "sign-flipped": lambda h: {k: -v for k, v in h.items()},
}
ROBUST = {
    "fedmedian": {}, "fedtrimmedavg": {"trim_beta": 0.2}, "krum": {},
    "multikrum": {"num_clients_to_select": 3}, "bulyan": {},
}


def _attacked_round(strategy: str, attack: str, **settings):
    # 6 honest + 1 hostile: Bulyan's 4f + 3 with f = 1. The norm guard is off here so
    # that the aggregator itself faces the attack.
    cfg = RunConfig(strategy=strategy, num_clients=7, min_train_clients=7,
                    num_malicious_clients=1, max_update_norm_ratio=0, **settings)
    _, arrays, honest_mean = _run_round(cfg, 6, {"arrays": ATTACKS[attack](_honest(42))})
    return np.linalg.norm(_flat(arrays) - honest_mean) / np.linalg.norm(honest_mean)


@pytest.mark.parametrize("attack", ATTACKS)
def test_fedavg_is_pulled_away_by_one_hostile_client(flower_identity, attack):
    assert _attacked_round("fedavg", attack) > 0.25  # x100: ~14; sign flip: 2/7


@pytest.mark.parametrize("attack", ATTACKS)
@pytest.mark.parametrize("strategy", ROBUST)
def test_robust_aggregators_stay_near_the_honest_mean(flower_identity, strategy, attack):
    assert _attacked_round(strategy, attack, **ROBUST[strategy]) < 0.05


@pytest.mark.parametrize("values, message", [
    ({"strategy": "krum", "num-clients": 4, "min-train-clients": 4,
      "num-malicious-clients": 1}, "'krum' with 'num-malicious-clients' 1 needs 'min-train-clients' >= 5"),
    ({"strategy": "bulyan", "num-clients": 6, "min-train-clients": 6,
      "num-malicious-clients": 1}, "'bulyan' with 'num-malicious-clients' 1 needs 'min-train-clients' >= 7"),
    ({"strategy": "fedmedian"}, "'fedmedian' with .* needs 'min-train-clients' >= 3"),
    ({"strategy": "fedtrimmedavg", "num-clients": 4, "min-train-clients": 4},
     "'trim-beta' 0.2 cuts nothing from 'min-train-clients' 4 replies: set 'trim-beta' >= 0.25"),
    ({"strategy": "multikrum", "num-clients": 5, "min-train-clients": 5,
      "num-malicious-clients": 1, "num-clients-to-select": 5}, "'num-clients-to-select' \\(5\\) must be <= "),
    ({"trim-beta": 0.5}, "'trim-beta' must be in \\[0, 0.5\\)"),
    ({"max-update-norm-ratio": -1}, "'max-update-norm-ratio' must be >= 0"),
    ({"max-num-examples": -1}, "'max-num-examples' must be >= 0"),
])
def test_robust_settings_are_checked_at_config_time(values, message):
    with pytest.raises(ValueError, match=message):
        RunConfig.from_mapping(values)


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["ray", "sequential"])
def test_a_crashing_client_does_not_stop_the_run(tiny_model_dir, tiny_dataset, tmp_path,
                                                 monkeypatch, backend):
    """3 clients, min-train-clients 2, partition 1 raises in every round (test hook in
    client/app.py): each round aggregates the other two and records one failure, under
    Flower's Ray engine and fedtune's sequential one (server/sequential.py)."""
    monkeypatch.setenv("FEDTUNE_TEST_CRASH_PARTITION", "1")
    run_dir = tmp_path / "run"
    result = fedtune(
        "simulate", "--model", str(tiny_model_dir), "--dataset", str(tiny_dataset),
        "--categories", "", "--partitioner", "iid", "--num-clients", "3",
        "--min-train-clients", "2", "--num-server-rounds", "2", "--local-steps", "1",
        "--batch-size", "4", "--eval-examples", "8", "--max-length", "64", "--lora-r", "4",
        "--backend", backend, "--run-dir", str(run_dir))
    assert result.returncode == 0, (result.stdout[-3000:], result.stderr[-3000:])
    history = [json.loads(l) for l in (run_dir / "history.jsonl").read_text().splitlines()]
    assert [row["round"] for row in history] == [0, 1, 2]
    for row in history[1:]:
        assert (row["clients"], row["failures"], row["rejected"], row["aggregated"]) == (2, 1, 0, 1)
    clients = [json.loads(l) for l in (run_dir / "clients.jsonl").read_text().splitlines()]
    assert sorted({c["partition-id"] for c in clients}) == [0, 2]
    assert "failures" in (run_dir / "history.csv").read_text().splitlines()[0]
    assert "| 1 failed, 0 rejected" in result.stdout


def test_corruption_hook_makes_nan_and_scaled_updates(monkeypatch):
    from client.faults import CORRUPT_ENV, corrupt_if_asked

    sent = {"w": torch.ones(3)}
    trained = {"w": torch.tensor([1.0, 2.0, 3.0])}
    monkeypatch.setenv(CORRUPT_ENV, "3:nan,7:scale1000")
    assert corrupt_if_asked(0, trained, sent) is trained
    assert torch.isnan(corrupt_if_asked(3, trained, sent)["w"]).all()
    scaled = corrupt_if_asked(7, trained, sent)["w"]
    assert torch.equal(scaled, torch.tensor([1.0, 1001.0, 2001.0]))
    monkeypatch.setenv(CORRUPT_ENV, "3:zero")
    with pytest.raises(ValueError, match="use PARTITION:nan or PARTITION:scaleK"):
        corrupt_if_asked(3, trained, sent)
