"""server-lr-search: after aggregation the server evaluates old + s * (aggregate - old)
for each candidate s and keeps the one with the lowest validation loss. Driven through
Flower's Strategy.start with fedtune's real RoundHook, RoundControl and strategy; nodes
add 0.01 to every entry they receive, and the validation loss is the squared distance of
the adapter to a fixed point, so the best s of each round is known by hand."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

import server.app as app_module
import server.control as control_module
from common.config import RunConfig
from server.app import RoundHook, format_row
from server.centralized import run_centralized
from server.checkpoints import RunFolder
from server.control import RoundControl
from server.strategies import build_strategy
from tests.test_lr_control import SHAPES
from tests.test_lr_reject import FakeModel, _saved
from tests.test_robust import EchoGrid

TARGET = np.float32(0.08)  # the validation loss is lowest at every entry == 0.08


def _loss(model) -> float:
    return float(sum(((v.numpy() - TARGET) ** 2).sum() for v in model.state.values()))


def _federate(cfg: RunConfig, monkeypatch, received: list, *, step=lambda r: 0.01,
              done: int = 0) -> RunFolder:
    """Rounds done+1..num-server-rounds; each node adds ``step(round)`` to every entry."""
    monkeypatch.setattr(control_module, "evaluate",
                        lambda model, *a, **k: SimpleNamespace(loss=_loss(model)))
    for module in (app_module, control_module):
        monkeypatch.setattr(module, "set_adapter_state",
                            lambda model, state: setattr(model, "state", dict(state)))
    run = RunFolder.reopen(cfg.run_dir) if done else RunFolder.create(cfg)
    strategy = build_strategy(cfg)
    initial = ArrayRecord({k: torch.zeros(s) for k, s in SHAPES.items()})
    if done:  # open_run's resume steps for a strategy without optimizer state
        strategy.round_offset = done
        run.rewind(done)
        initial = ArrayRecord({k: Array(np.ascontiguousarray(v))
                               for k, v in run.load_state().arrays.items()})
    train_config = ConfigRecord()
    control = RoundControl(cfg, run, [{}], 0, train_config, resumed_round=done)
    hook = RoundHook(cfg, run, FakeModel(), SimpleNamespace(pad_token_id=0), [], strategy,
                     resumed_round=done, control=control)

    def answer(msg):
        server_round = int(msg.content["config"]["server-round"])
        sent = {k: a.numpy().copy() for k, a in msg.content["arrays"].items()}
        received.append((server_round, sent))  # what each round's clients start from
        arrays = {k: torch.from_numpy(v + np.float32(step(server_round))) for k, v in sent.items()}
        return Message(content=RecordDict({"arrays": ArrayRecord(arrays), "metrics": MetricRecord(
            {"train-loss": 1.0, "num-examples": 10})}), reply_to=msg)

    strategy.start(grid=EchoGrid([1, 2], answer), initial_arrays=initial,
                   num_rounds=cfg.num_server_rounds - done, train_config=train_config,
                   evaluate_fn=hook)
    return run


def _cfg(tmp_path, **kw) -> RunConfig:
    return RunConfig(**{"num_clients": 2, "num_server_rounds": 3, "max_update_norm_ratio": 0,
                        "eval_examples": 0, "run_dir": str(tmp_path / "run"),
                        "server_lr_search": "1,2,4", **kw})


def test_each_round_keeps_the_step_with_the_lowest_validation_loss(flower_identity,
                                                                   monkeypatch, tmp_path):
    # Every round's update is +0.01 an entry. Round 1 from 0: s 1, 2, 4 give 0.01, 0.02,
    # 0.04, best 4 (0.04). Round 2 from 0.04: 0.05, 0.06, 0.08, best 4 (0.08, the
    # minimum). Round 3 from 0.08: 0.09, 0.10, 0.12, best 1 (the aggregate as is).
    received = []
    run = _federate(_cfg(tmp_path), monkeypatch, received)
    rows = run.history()
    assert [r.get("server-lr") for r in rows[1:]] == [4.0, 4.0, 1.0]
    expected = {1: 0.04, 2: 0.08, 3: 0.09}
    adapters = {r: _saved(run.path, f"adapters/round-{r}") for r in expected}
    for r, value in expected.items():
        for k in SHAPES:
            np.testing.assert_allclose(adapters[r][k], value, atol=1e-6)
        # the history's val-loss is the kept adapter's
        assert rows[r]["val-loss"] == pytest.approx(
            sum(((adapters[r][k] - TARGET) ** 2).sum() for k in SHAPES), abs=1e-9)
    # the next round's clients start from the kept adapter, bit for bit (not Flower's
    # aggregate), and the state --resume reads holds it too
    for server_round, arrays in received:
        if server_round > 1:
            for k in SHAPES:
                np.testing.assert_array_equal(arrays[k], adapters[server_round - 1][k])
    state = run.load_state()
    assert all(np.array_equal(state.arrays[k], adapters[3][k]) for k in SHAPES)
    assert "server lr 4" in format_row(rows[1])


def test_when_the_aggregate_wins_every_round_the_run_is_plain_fedavg_bit_for_bit(
        flower_identity, monkeypatch, tmp_path):
    # Candidates 0.5 and 1: the update (+0.01 an entry) always falls short of 0.08, so
    # s 1 wins every round, and every adapter equals the plain run's, bit for bit.
    run = _federate(_cfg(tmp_path, server_lr_search="0.5,1"), monkeypatch, [])
    assert [r.get("server-lr") for r in run.history()[1:]] == [1.0, 1.0, 1.0]
    plain = _federate(_cfg(tmp_path, server_lr_search="", early_stopping_patience=0,
                           run_dir=str(tmp_path / "plain")), monkeypatch, [])
    assert "server-lr" not in plain.history()[1]
    for r in (1, 2, 3):
        ours, theirs = (_saved(f.path, f"adapters/round-{r}") for f in (run, plain))
        assert all(np.array_equal(ours[k], theirs[k]) for k in SHAPES)


def test_a_round_that_aggregates_nothing_keeps_the_chosen_adapter(flower_identity,
                                                                  monkeypatch, tmp_path):
    # Round 1 keeps s 4 (0.04). In round 2 every reply is NaN, the guard rejects both and
    # nothing is aggregated: the global adapter stays 0.04 (not Flower's own last
    # aggregate, 0.01), saved as round 2's and sent to round 3's clients.
    received = []
    run = _federate(_cfg(tmp_path), monkeypatch, received,
                    step=lambda r: float("nan") if r == 2 else 0.01)
    rows = run.history()
    assert [r.get("aggregated") for r in rows[1:]] == [1, 0, 1]
    kept = _saved(run.path, "adapters/round-1")
    np.testing.assert_allclose(kept["a.weight"], 0.04, atol=1e-6)
    assert all(np.array_equal(_saved(run.path, "adapters/round-2")[k], kept[k]) for k in SHAPES)
    third = next(arrays for r, arrays in received if r == 3)
    assert all(np.array_equal(third[k], kept[k]) for k in SHAPES)


def test_resume_goes_on_exactly_as_the_uninterrupted_run(flower_identity, monkeypatch,
                                                         tmp_path):
    full = _federate(_cfg(tmp_path, run_dir=str(tmp_path / "full")), monkeypatch, [])
    part = _cfg(tmp_path, run_dir=str(tmp_path / "part"), num_server_rounds=2)
    _federate(part, monkeypatch, [])
    resumed = _federate(part.replace(num_server_rounds=3, resume_from=part.run_dir),
                        monkeypatch, [], done=2)
    assert [r.get("server-lr") for r in resumed.history()[1:]] == [4.0, 4.0, 1.0]
    ours, theirs = (_saved(f.path, "adapters/round-3") for f in (resumed, full))
    assert all(np.array_equal(ours[k], theirs[k]) for k in SHAPES)


def test_nan_losses_lose_and_an_all_nan_round_keeps_the_aggregate(monkeypatch):
    losses = iter([float("nan"), 2.0, 1.0, float("nan"), float("nan")])
    monkeypatch.setattr(control_module, "evaluate",
                        lambda *a, **k: SimpleNamespace(loss=next(losses)))
    monkeypatch.setattr(control_module, "set_adapter_state",
                        lambda model, state: setattr(model, "state", dict(state)))
    control = RoundControl(RunConfig(server_lr_search="1,2,4"), None, [{}], 0)
    old = ArrayRecord({"a": torch.zeros(2)})
    new = ArrayRecord({"a": torch.ones(2)})
    chosen, row = control.search_server_lr(FakeModel(), new, old)  # NaN, 2.0, 1.0
    assert row == {"server-lr": 4.0, "val-loss": 1.0}
    np.testing.assert_array_equal(chosen["a"].numpy(), [4.0, 4.0])
    control = RoundControl(RunConfig(server_lr_search="1,2"), None, [{}], 0)
    chosen, row = control.search_server_lr(FakeModel(), new, old)  # NaN, NaN
    assert chosen is new and row["server-lr"] == 1.0 and np.isnan(row["val-loss"])


@pytest.mark.parametrize("value, why", [
    ("1,x", "not a number"), ("0", "not a number"), ("1,-2", "not a number"),
    ("nan", "not a number"), ("inf", "not a number"), ("1e999", "not a number"),
    ("1_0", "not a number"), ("1,,2", "not a number"), ("1,2,1", "repeated"),
])
def test_a_malformed_candidate_list_is_refused_naming_the_entry(value, why):
    with pytest.raises(ValueError, match=f"'server-lr-search'.*is {why}"):
        RunConfig(server_lr_search=value)


def test_a_blank_list_is_off_and_draws_no_validation_split():
    assert RunConfig(server_lr_search=" ").server_lr_candidates == ()
    assert not RunConfig(server_lr_search=" ").uses_validation
    assert RunConfig(server_lr_search=" 0.5, 2 ").server_lr_candidates == (0.5, 2.0)


@pytest.mark.parametrize("setting, words", [
    ({"strategy": "fedadam"}, "works with strategy"),
    ({"lora_aggregation": "exact"}, "'lora-aggregation' naive only"),
    ({"client_dp": "central"}, "cannot run with 'client-dp'"),
    ({"validation_examples": 0}, "'validation-examples' is 0"),
])
def test_settings_it_cannot_serve_are_refused(setting, words):
    with pytest.raises(ValueError, match=words):
        RunConfig(server_lr_search="1,2", **setting)


def test_centralized_training_refuses_it(tmp_path):
    with pytest.raises(ValueError, match="federated runs only"):
        run_centralized(RunConfig(server_lr_search="1,2", run_dir=str(tmp_path / "run")))


def test_it_draws_the_validation_split():
    assert RunConfig(server_lr_search="1,2").uses_validation
    assert not RunConfig().uses_validation
