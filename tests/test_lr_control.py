"""Loss-driven control (common/lr_control.py, server/control.py): torch's plateau rule
against a sequence computed by hand, the lr reaching the clients through Flower's own
Strategy.start, early stopping ending the federation, and an exact resume."""

import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

import server.control as control_module
from common.config import RunConfig
from common.lr_control import EarlyStopping, LossControl, PlateauLR
from server.checkpoints import RunFolder, ServerState
from server.control import FederationStopped, RoundControl, report_early_stop
from server.strategies import build_strategy
from tests.test_robust import EchoGrid

# factor 0.5, patience 1, cooldown 1, min lr 2e-4, threshold 1e-3 (relative), from 1e-3.
LOSSES = [3.0, 2.9, 2.898, 2.95, 2.8, 2.8, 2.8, 2.8, 2.8, 2.8, 2.8, 2.8, float("nan")]
# By hand, with "better" = loss < best * (1 - 1e-3) and a cut when bad rounds > patience:
#  1: 3.0 best                      1e-3      7: bad 2 > 1: cut, cooldown 1   2.5e-4
#  2: 2.9 best (< 2.997)            1e-3      8: bad 1, cooldown: reset to 0  2.5e-4
#  3: 2.898 not < 2.8971: bad 1     1e-3      9: bad 1                        2.5e-4
#  4: 2.95 bad 2 > 1: cut           5e-4     10: bad 2: cut to max(1.25e-4, 2e-4) = 2e-4
#  5: 2.8 best; cooldown: bad 0     5e-4     11: bad 1 (cooldown ends)       2e-4
#  6: 2.8 not better: bad 1         5e-4     12: bad 2: at min lr, no change  2e-4
#                                            13: NaN is no improvement: bad 1 2e-4
EXPECTED = [1e-3, 1e-3, 1e-3, 5e-4, 5e-4, 5e-4, 2.5e-4, 2.5e-4, 2.5e-4, 2e-4, 2e-4, 2e-4, 2e-4]
SETTINGS = dict(lr_plateau=True, lr=1e-3, lr_plateau_factor=0.5, lr_plateau_patience=1,
                lr_plateau_cooldown=1, lr_plateau_min_lr=2e-4, lr_plateau_threshold=1e-3)


def _plateau() -> PlateauLR:
    return PlateauLR(lr=1e-3, factor=0.5, patience=1, cooldown=1, min_lr=2e-4, threshold=1e-3)


def test_plateau_rule_matches_the_hand_computed_sequence():
    rule = _plateau()
    assert [rule.step(loss) for loss in LOSSES] == pytest.approx(EXPECTED, rel=1e-12)


# Bold driver on top: increase 2, cap 3e-3; factor 0.5, patience 0, cooldown 1, min lr
# 1e-4, threshold 1e-3, from 1e-3.
BOLD_LOSSES = [3.0, 2.9, 2.8, 2.85, 2.9, 2.799, 2.7, 2.7, float("nan"), 2.0, 2.1]
# By hand ("better" = loss < best * (1 - 1e-3); a cut when bad rounds > 0):
#  1: 3.0 better than +inf: raise              2e-3
#  2: 2.9 better (< 2.997): raise to 4e-3, cap  3e-3
#  3: 2.8 better (< 2.8971): at the cap         3e-3
#  4: 2.85 bad 1 > 0: cut, cooldown 1           1.5e-3   (torch's bad count is 0 again:
#  5: 2.9 bad, cooldown: not counted            1.5e-3    neither 4 nor 5 is "improved")
#  6: 2.799 not < 2.7972: bad 1: cut            7.5e-4
#  7: 2.7 better, in cooldown: raise            1.5e-3
#  8: 2.7 not better: cut, cooldown 1           7.5e-4
#  9: NaN: no improvement, cooldown             7.5e-4
# 10: 2.0 better: raise                         1.5e-3
# 11: 2.1 bad: cut                              7.5e-4
BOLD_EXPECTED = [2e-3, 3e-3, 3e-3, 1.5e-3, 1.5e-3, 7.5e-4, 1.5e-3, 7.5e-4, 7.5e-4, 1.5e-3, 7.5e-4]
BOLD = dict(lr_plateau_factor=0.5, lr_plateau_patience=0, lr_plateau_cooldown=1,
            lr_plateau_min_lr=1e-4, lr_plateau_threshold=1e-3, lr_plateau_increase=2.0,
            lr_plateau_max_lr=3e-3)


def _bold() -> PlateauLR:
    return PlateauLR(lr=1e-3, factor=0.5, patience=0, cooldown=1, min_lr=1e-4, threshold=1e-3,
                     increase=2.0, max_lr=3e-3)


def test_bold_driver_matches_the_hand_computed_sequence():
    rule = _bold()
    assert [rule.step(loss) for loss in BOLD_LOSSES] == pytest.approx(BOLD_EXPECTED, rel=1e-12)


def test_increase_1_is_torchs_rule_exactly():
    """increase 1.0 (the default) and no cap: the same lrs and state as torch's
    ReduceLROnPlateau stepped directly, bit for bit."""
    ours = PlateauLR(lr=1e-3, factor=0.5, patience=1, cooldown=1, min_lr=2e-4, threshold=1e-3,
                     increase=1.0, max_lr=0.0)
    holder = torch.optim.SGD([torch.zeros(0, requires_grad=True)], lr=1e-3)
    torch_rule = torch.optim.lr_scheduler.ReduceLROnPlateau(
        holder, mode="min", factor=0.5, patience=1, cooldown=1, min_lr=2e-4, threshold=1e-3)
    for loss in LOSSES:
        torch_rule.step(math.inf if math.isnan(loss) else loss)
        assert ours.step(loss) == holder.param_groups[0]["lr"]
    assert ours.state_dict() == {k: torch_rule.state_dict()[k] for k in ours.state_dict()}


@pytest.mark.parametrize("split", range(1, len(BOLD_LOSSES)))
def test_bold_driver_state_round_trips_mid_sequence(split):
    """Saved after any round (right after a raise, a cut, in cooldown), through JSON,
    restored into a fresh rule: the rest is the uninterrupted run's, bit for bit."""
    whole, first = _bold(), _bold()
    lrs = [whole.step(loss) for loss in BOLD_LOSSES]
    for loss in BOLD_LOSSES[:split]:
        first.step(loss)
    restored = _bold()
    restored.load_state_dict(json.loads(json.dumps(first.state_dict())))
    assert restored.lr == lrs[split - 1] and restored.state_dict() == first.state_dict()
    assert [restored.step(loss) for loss in BOLD_LOSSES[split:]] == lrs[split:]
    assert restored.state_dict() == whole.state_dict()


def test_bold_driver_settings_are_checked():
    with pytest.raises(ValueError, match="increase must be a finite number >= 1"):
        PlateauLR(lr=1e-3, factor=0.5, patience=0, increase=0.5)
    with pytest.raises(ValueError, match="max_lr must be 0"):
        PlateauLR(lr=1e-3, factor=0.5, patience=0, increase=2.0, max_lr=5e-4)
    for bad in (0.99, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="'lr-plateau-increase' must be a finite number >= 1"):
            RunConfig(lr_plateau_increase=bad)
    with pytest.raises(ValueError, match="'lr-plateau-max-lr' must be >= 0"):
        RunConfig(lr_plateau_max_lr=-1.0)
    with pytest.raises(ValueError, match="'lr-plateau-max-lr' 0.0005 is below 'lr' 0.001"):
        RunConfig(lr_plateau=True, lr=1e-3, lr_plateau_max_lr=5e-4)
    with pytest.raises(ValueError, match="below .* 'lr-plateau-min-lr' 0.01"):
        RunConfig(lr_plateau=True, lr=1e-3, lr_plateau_min_lr=1e-2, lr_plateau_max_lr=5e-3)
    RunConfig(lr_plateau=True, lr=1e-3, lr_plateau_increase=1.5, lr_plateau_max_lr=1e-3)


def test_plateau_settings_are_checked():
    with pytest.raises(ValueError, match="factor must be in"):
        PlateauLR(lr=1e-3, factor=1.0, patience=1)
    with pytest.raises(ValueError, match="lr-plateau-factor"):
        RunConfig(lr_plateau_factor=0.0)
    with pytest.raises(ValueError, match="'lr-plateau-factor' 0.25, 'lr-plateau-increase' 2.0 "
                                         "set but 'lr-plateau' is false"):
        RunConfig(lr_plateau_factor=0.25, lr_plateau_increase=2.0)  # would do nothing
    with pytest.raises(ValueError, match="validation-examples' is 0"):
        RunConfig(lr_plateau=True, validation_examples=0)
    with pytest.raises(ValueError, match="adamw-schedulefree cannot run under 'dp-sgd'"):
        RunConfig(optimizer="adamw-schedulefree", dp_sgd=True)


def test_early_stopping_counts_rounds_since_the_best():
    stopper = EarlyStopping(patience=2, best=3.0)
    assert [stopper.update(x, r) for r, x in enumerate([2.5, 2.6, 2.4, 2.45, 2.5], 1)] == [
        False, False, False, False, True]
    assert stopper.best_round == 3 and "best 2.4000 after round 3" in stopper.reason()
    assert not any(EarlyStopping(0, 1.0).update(9.0) for _ in range(5))  # 0 = off


@pytest.mark.parametrize("rule, losses", [({}, LOSSES), (BOLD, BOLD_LOSSES)],
                         ids=["plateau", "bold-driver"])
def test_controller_state_resumes_bit_exactly_through_the_run_folder(tmp_path, rule, losses):
    cfg = RunConfig(**{**SETTINGS, **rule}, early_stopping_patience=20,
                    run_dir=str(tmp_path / "run"))
    whole, split = LossControl(cfg), LossControl(cfg)
    whole.start(3.5), split.start(3.5)
    for r, loss in enumerate(losses, 1):
        whole.update(loss, r)
    for r, loss in enumerate(losses[:6], 1):
        split.update(loss, r)
    run = RunFolder.create(cfg)
    run.save_state(ServerState(server_round=6, arrays={"a": np.zeros(2, np.float32)},
                               config=cfg.to_mapping(), control=split.state_dict()))
    # a fresh controller restored from disk goes on exactly as the uninterrupted one
    restored = RoundControl(cfg, run, [{}], 0, ConfigRecord(), resumed_round=6).loss_control
    assert restored.state_dict() == split.state_dict()
    for r, loss in enumerate(losses[6:], 7):
        restored.update(loss, r)
    assert json.dumps(restored.state_dict()) == json.dumps(whole.state_dict())
    assert restored.plateau.lr == whole.plateau.lr  # bit-equal, not approximately


def test_resuming_a_run_that_stopped_early_is_refused(tmp_path):
    cfg = RunConfig(early_stopping_patience=1, run_dir=str(tmp_path / "run"))
    stopped = LossControl(cfg)
    stopped.start(1.0)
    stopped.update(2.0, 1)
    run = RunFolder.create(cfg)
    run.save_state(ServerState(server_round=1, arrays={"a": np.zeros(2, np.float32)},
                               config=cfg.to_mapping(), control=stopped.state_dict()))
    from server.checkpoints import check_resumable  # before open_run touches the folder

    more = cfg.replace(num_server_rounds=4)
    with pytest.raises(ValueError, match="stopped early after round 1 .* raise --early-stopping"):
        check_resumable(run.load_state(), more, run.path)
    check_resumable(run.load_state(), more.replace(early_stopping_patience=3), run.path)
    RoundControl(more.replace(early_stopping_patience=3), run, [{}], 0, resumed_round=1)


SHAPES = {"b.weight": (3, 2), "a.weight": (2, 4)}


def _answer(seen: list):
    """Each node records the lr its train config carried and moves the arrays a bit."""
    def answer(msg: Message) -> Message:
        config = msg.content["config"]
        seen.append((int(config["server-round"]), config.get("lr")))
        arrays = {k: a.numpy() + 0.01 for k, a in msg.content["arrays"].items()}
        content = RecordDict({"arrays": ArrayRecord({k: torch.from_numpy(v) for k, v in arrays.items()}),
                              "metrics": MetricRecord({"train-loss": 1.0, "num-examples": 10})})
        return Message(content=content, reply_to=msg)
    return answer


def test_lr_reaches_the_clients_and_early_stopping_ends_the_federation(
        flower_identity, monkeypatch, tmp_path):
    """Through Flower's Strategy.start: the lr each round's clients receive is the
    plateau rule's, and the round after which early stopping fires is the last one."""
    cfg = RunConfig(**SETTINGS, early_stopping_patience=5, num_clients=2,
                    num_server_rounds=len(LOSSES), max_update_norm_ratio=0,
                    run_dir=str(tmp_path / "run"))
    run = RunFolder.create(cfg)
    losses = iter([3.5] + LOSSES)  # round 0, then one per round
    monkeypatch.setattr(control_module, "evaluate",
                        lambda *a, **k: SimpleNamespace(loss=next(losses)))
    train_config = ConfigRecord()
    control = RoundControl(cfg, run, [{}], 0, train_config)
    rows = {}

    def hook(server_round, arrays):  # RoundHook's order: observe, save, log, then stop
        rows[server_round] = control.observe(None, server_round)
        run.append_history({"round": server_round, "mb-total": 0.5 * server_round,
                            "seconds": 2.0 * server_round})
        control.stop_if_done(server_round)

    seen = []
    initial = ArrayRecord({k: torch.zeros(s) for k, s in SHAPES.items()})
    with pytest.raises(FederationStopped) as stop:
        build_strategy(cfg).start(grid=EchoGrid([1, 2], _answer(seen)), initial_arrays=initial,
                                  num_rounds=cfg.num_server_rounds, train_config=train_config,
                                  evaluate_fn=hook)
    # best 2.8 after round 5; rounds 6..10 do not beat it: patience 5 ends round 10
    assert stop.value.server_round == 10
    assert "has not improved for 5 rounds (best 2.8000 after round 5" in str(stop.value)
    assert sorted({r for r, _ in seen}) == list(range(1, 11))  # no round 11 was sent
    # round r's clients trained at the lr the rule set after round r - 1
    by_round = dict(seen)
    assert [by_round[r] for r in range(1, 11)] == pytest.approx([1e-3] + EXPECTED[:9], rel=1e-12)
    assert [rows[r]["lr"] for r in range(1, 11)] == [by_round[r] for r in range(1, 11)]
    saved = report_early_stop(cfg, run, stop.value)
    assert saved["rounds-saved"] == 3 and saved["mb-saved"] == pytest.approx(1.5)
    assert saved["seconds-saved"] == pytest.approx(6.0)
    assert json.loads((run.path / "early-stop.json").read_text())["stopped-after-round"] == 10


def test_bold_driver_lr_travels_in_the_round_config(flower_identity, monkeypatch, tmp_path):
    """The config keys reach the rule (RunConfig -> LossControl -> PlateauLR), and the
    round config carries the raised and cut lrs the hand-computed sequence says."""
    cfg = RunConfig(**{**SETTINGS, **BOLD}, run_dir=str(tmp_path / "run"))
    losses = iter([3.5] + BOLD_LOSSES)
    monkeypatch.setattr(control_module, "evaluate",
                        lambda *a, **k: SimpleNamespace(loss=next(losses)))
    train_config = ConfigRecord()
    control = RoundControl(cfg, RunFolder.create(cfg), [{}], 0, train_config)
    sent = [train_config["lr"]]
    for server_round in range(len(BOLD_LOSSES) + 1):
        control.observe(None, server_round)
        sent.append(train_config["lr"])
    assert sent[0] == sent[1] == 1e-3  # round 0 (before training) moves nothing
    assert sent[2:] == pytest.approx(BOLD_EXPECTED, rel=1e-12)


def test_without_plateau_no_lr_travels(flower_identity, tmp_path):
    cfg = RunConfig(early_stopping_patience=2, run_dir=str(tmp_path / "run"))
    train_config = ConfigRecord()
    RoundControl(cfg, RunFolder.create(cfg), [{}], 0, train_config)
    assert "lr" not in train_config and not math.isnan(cfg.lr)


@pytest.mark.slow
def test_simulate_stops_early_exits_0_and_says_why(tiny_model_dir, tiny_dataset, tmp_path):
    from tests.test_cli import fedtune

    run = tmp_path / "run"
    # lr 50 without clipping blows the adapter up: the validation loss cannot improve
    result = fedtune("simulate", "--model", str(tiny_model_dir), "--dataset", str(tiny_dataset),
                     "--categories", "", "--num-clients", "2", "--num-server-rounds", "4",
                     "--local-steps", "2", "--batch-size", "4", "--eval-examples", "8",
                     "--validation-examples", "8", "--max-length", "64", "--lora-r", "4",
                     "--lr", "50", "--lr-schedule", "constant", "--max-grad-norm", "0",
                     "--max-update-norm-ratio", "0", "--lr-plateau", "true",
                     "--early-stopping-patience", "1", "--run-dir", str(run))
    assert result.returncode == 0, (result.stdout[-3000:], result.stderr[-3000:])
    import re

    found = re.search(r"early stop after round (\d): validation loss has not improved for 1 "
                      r"rounds", result.stdout)
    assert found, result.stdout
    stopped = int(found.group(1))  # round 1 may still improve; the NaN rounds after cannot
    assert stopped < 4 and f"early stopping saved {4 - stopped} of 4 rounds" in result.stdout
    rows = [json.loads(l) for l in (run / "history.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == list(range(stopped + 1)) and rows[1]["lr"] == 50.0
    assert all("val-loss" in r for r in rows)
    assert json.loads((run / "early-stop.json").read_text())["rounds-saved"] == 4 - stopped
    state = json.loads((run / "state" / f"round-{stopped}.json").read_text())
    assert state["control"]["stopper"]["since_best"] == 1
    assert set(state["control"]) == {"stopper", "plateau"}
