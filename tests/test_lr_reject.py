"""lr-plateau-reject (Battiti's bold driver with undo): a round whose validation loss is
not better is discarded, the next round starts from the last accepted global adapter at
the cut lr, and --resume goes on bit-exactly. Fast tests drive fedtune's real RoundHook,
RoundControl and strategy through Flower's own Strategy.start, with scripted validation
losses and nodes that add 0.01 to what they receive; the slow one is a real run."""

import json
import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord

import server.app as app_module
import server.control as control_module
from common.config import RunConfig
from server.app import RoundHook, format_row
from server.checkpoints import RunFolder
from server.control import RoundControl
from server.strategies import build_strategy
from tests.test_lr_control import SHAPES, _answer
from tests.test_robust import EchoGrid

# x2 up, /4 down, patience 0; round 3's loss is worse than round 2's: rejected.
RULE = dict(lr_plateau=True, lr_plateau_reject=True, lr=1e-3, lr_plateau_patience=0,
            lr_plateau_factor=0.25, lr_plateau_increase=2.0, lr_plateau_threshold=1e-3)
LOSSES = [3.5, 3.0, 2.9, 3.1, 2.8, 2.9]  # rounds 0..5; rounds 3 and 5 are rejected
LRS = [1e-3, 2e-3, 4e-3, 1e-3, 2e-3]  # what rounds 1..5's clients train at


class FakeModel:
    """Holds the adapter the hook sets; saves it as the round's adapter file."""

    def __init__(self):
        self.state = {}

    def modules(self):  # set_residual's loop: nothing to install
        return []

    def named_modules(self):  # get_residual's loop: none installed
        return []

    def save_pretrained(self, folder):
        np.savez(Path(folder) / "adapter.npz", **{k: v.numpy() for k, v in self.state.items()})


def _saved(run: Path, name: str) -> dict:
    with np.load(run / name / "adapter.npz") as saved:
        return dict(saved)


def _federate(cfg: RunConfig, losses: list[float], seen: list, monkeypatch, *,
              done: int = 0, initial: ArrayRecord | None = None) -> RunFolder:
    """Rounds done+1..num-server-rounds of a run, as server/app.py main runs them."""
    losses = iter(losses)
    monkeypatch.setattr(control_module, "evaluate",
                        lambda *a, **k: SimpleNamespace(loss=next(losses)))
    monkeypatch.setattr(app_module, "set_adapter_state",
                        lambda model, state: setattr(model, "state", dict(state)))
    run = RunFolder.reopen(cfg.run_dir) if done else RunFolder.create(cfg)
    strategy = build_strategy(cfg)
    train_config = ConfigRecord()
    if done:  # open_run's resume steps for a strategy without optimizer state
        strategy.round_offset = done
        run.rewind(done)
        state = run.load_state()
        initial = ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in state.arrays.items()})
    control = RoundControl(cfg, run, [{}], 0, train_config, resumed_round=done)
    hook = RoundHook(cfg, run, FakeModel(), SimpleNamespace(pad_token_id=0), [], strategy,
                     resumed_round=done, control=control)
    strategy.start(grid=EchoGrid([1, 2], _answer(seen)), initial_arrays=initial,
                   num_rounds=cfg.num_server_rounds - done, train_config=train_config,
                   evaluate_fn=hook)
    return run


def _initial() -> ArrayRecord:
    return ArrayRecord({k: torch.zeros(s) for k, s in SHAPES.items()})


def _cfg(tmp_path, name: str, rounds: int = 5) -> RunConfig:
    return RunConfig(**RULE, num_clients=2, num_server_rounds=rounds, max_update_norm_ratio=0,
                     eval_examples=0, run_dir=str(tmp_path / name))


def test_a_rejected_round_is_undone_bit_exactly_and_the_lr_cut(flower_identity, monkeypatch,
                                                               tmp_path):
    seen = []
    run = _federate(_cfg(tmp_path, "run"), LOSSES, seen, monkeypatch, initial=_initial())
    rows = run.history()
    assert [r.get("rejected-round", 0) for r in rows] == [0, 0, 0, 1, 0, 1]
    # the lr each round's clients got: raised after rounds 1, 2 and 4, cut /4 after 3
    by_round = dict(seen)
    assert [by_round[r] for r in range(1, 6)] == pytest.approx(LRS, rel=1e-12)
    adapters = {r: _saved(run.path, f"adapters/round-{r}") for r in range(1, 6)}
    # an accepted round moves the global adapter (each node adds 0.01 to what it got)
    assert not np.array_equal(adapters[2]["a.weight"], adapters[1]["a.weight"])
    # the rejected round 3: its saved adapter is round 2's, bit for bit
    assert all(np.array_equal(adapters[3][k], adapters[2][k]) for k in SHAPES)
    # and round 4 started from round 2's adapter: its aggregate is round 2's + 0.01
    for k in SHAPES:
        np.testing.assert_array_equal(adapters[4][k],
                                      (adapters[2][k] + np.float32(0.01)).astype(np.float32))
    # the last round was rejected too: the run's adapter is round 4's, and so is its state
    assert os.readlink(run.path / "adapter") == "adapters/round-5"
    assert all(np.array_equal(_saved(run.path, "adapter")[k], adapters[4][k]) for k in SHAPES)
    state = run.load_state()
    assert state.server_round == 5
    assert all(np.array_equal(state.arrays[k], adapters[4][k]) for k in SHAPES)
    line = format_row(rows[3])
    assert "round rejected (validation loss not better): previous global adapter kept" in line


def test_a_first_round_worse_than_before_training_is_undone(flower_identity, monkeypatch,
                                                            tmp_path):
    """Round 1 is judged against round 0's validation loss (torch's rule alone would
    count any first round as better): a diverged first round is undone, the lr cut."""
    seen = []
    run = _federate(_cfg(tmp_path, "run", rounds=2), [3.0, 3.5, 2.9], seen, monkeypatch,
                    initial=_initial())
    assert [r.get("rejected-round", 0) for r in run.history()] == [0, 1, 0]
    assert [lr for _, lr in sorted(dict(seen).items())] == pytest.approx([1e-3, 2.5e-4])
    first = _saved(run.path, "adapters/round-1")
    assert all(np.array_equal(first[k], np.zeros(s, np.float32)) for k, s in SHAPES.items())


def test_a_refused_resume_is_refused_before_the_run_folder_is_touched(tmp_path):
    """check_resumable (the preflight of `fedtune simulate` and the first step of
    open_run, before it rewinds or rewrites config.json) refuses turning lr-plateau on
    (test_lr_control has the early-stopped case)."""
    from server.checkpoints import check_resumable

    plain = RunConfig(num_server_rounds=2)
    state = SimpleNamespace(config=plain.to_mapping(), server_round=2, control={})
    with pytest.raises(ValueError, match="with 'lr-plateau' on: it ran without it"):
        check_resumable(state, RunConfig(**RULE, num_server_rounds=4), tmp_path)


@pytest.mark.parametrize("stop_after", [2, 3])
def test_resume_after_a_rejection_equals_the_uninterrupted_run(flower_identity, monkeypatch,
                                                               tmp_path, stop_after):
    """Stopped after round 2 (before the rejection) or 3 (the rejected round itself):
    the resumed run ends with the uninterrupted run's adapter, state, lrs and rows."""
    whole_seen, split_seen = [], []
    whole = _federate(_cfg(tmp_path, "whole"), LOSSES, whole_seen, monkeypatch, initial=_initial())
    _federate(_cfg(tmp_path, "split", stop_after), LOSSES[:stop_after + 1], split_seen,
              monkeypatch, initial=_initial())
    split = _federate(_cfg(tmp_path, "split").replace(resume_from=str(tmp_path / "split")),
                      LOSSES[stop_after + 1:], split_seen, monkeypatch, done=stop_after)
    assert split_seen == whole_seen  # every round's lr, and no round twice
    a, b = _saved(whole.path, "adapter"), _saved(split.path, "adapter")
    assert all(np.array_equal(a[k], b[k]) for k in SHAPES)
    s_whole, s_split = whole.load_state(), split.load_state()
    assert all(np.array_equal(s_whole.arrays[k], s_split.arrays[k]) for k in SHAPES)
    assert json.dumps(s_whole.control) == json.dumps(s_split.control)
    keep = ("round", "val-loss", "lr", "rejected-round")
    assert ([{k: r[k] for k in keep if k in r} for r in whole.history()]
            == [{k: r[k] for k in keep if k in r} for r in split.history()])


def test_bad_combinations_are_refused():
    with pytest.raises(ValueError, match="'lr-plateau-reject' needs 'lr-plateau' true"):
        RunConfig(lr_plateau_reject=True)
    for strategy in ("fedadam", "fedyogi", "fedadagrad", "fedavgm", "reptile", "krum"):
        with pytest.raises(ValueError, match=f"only, got '{strategy}'"):
            RunConfig(**RULE, strategy=strategy)
    with pytest.raises(ValueError, match="'lora-aggregation' naive only, got 'exact'"):
        RunConfig(**RULE, lora_aggregation="exact")
    with pytest.raises(ValueError, match="cannot run with 'client-dp'"):
        RunConfig(**RULE, client_dp="server-fixed")
    for key in ("lr_plateau_patience", "lr_plateau_cooldown"):
        with pytest.raises(ValueError, match=f"needs '{key.replace('_', '-')}' 0"):
            RunConfig(**{**RULE, key: 1})
    RunConfig(**RULE, strategy="fedprox", proximal_mu=0.01)


def test_fedtune_train_refuses_reject(tmp_path):
    from server.centralized import run_centralized

    with pytest.raises(ValueError, match="federated runs only"):
        run_centralized(RunConfig(**RULE, run_dir=str(tmp_path / "run")))


@pytest.mark.slow
def test_real_run_with_a_rejection_resumes_bit_exactly(tiny_model_dir, tiny_dataset, tmp_path):
    """A real `fedtune simulate` on the tiny model: lr 50 without clipping makes some
    round worse (so it is rejected), and a resume after it matches the whole run."""
    from safetensors.torch import load_file

    from tests.test_cli import fedtune

    def simulate(run: Path, rounds: int, *extra: str):
        args = ["simulate", "--num-server-rounds", str(rounds)]
        if not extra:
            args += ["--model", str(tiny_model_dir), "--dataset", str(tiny_dataset),
                     "--categories", "", "--num-clients", "2", "--local-steps", "2",
                     "--batch-size", "4", "--eval-examples", "8", "--validation-examples", "8",
                     "--max-length", "64", "--lora-r", "4", "--lr", "50",
                     "--lr-schedule", "constant", "--max-grad-norm", "0",
                     "--max-update-norm-ratio", "0", "--lr-plateau", "true",
                     "--lr-plateau-patience", "0", "--lr-plateau-factor", "0.25",
                     "--lr-plateau-increase", "2", "--lr-plateau-reject", "true",
                     "--run-dir", str(run)]
        result = fedtune(*args, *extra)
        assert result.returncode == 0, (result.stdout[-3000:], result.stderr[-3000:])
        return result

    whole, split = tmp_path / "whole", tmp_path / "split"
    simulate(whole, 4)
    rows = [json.loads(l) for l in (whole / "history.jsonl").read_text().splitlines()]
    rejected = [r["round"] for r in rows if r.get("rejected-round")]
    assert rejected, rows  # lr 50 unclipped: some round is worse than the best
    first = rejected[0]
    # the rejected round's adapter is the previous round's (round 0: nothing saved)
    if first > 1:
        a = load_file(whole / "adapters" / f"round-{first}" / "adapter_model.safetensors")
        b = load_file(whole / "adapters" / f"round-{first - 1}" / "adapter_model.safetensors")
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert rows[first]["lr"] * 0.25 == pytest.approx(rows[first + 1]["lr"]) if first < 4 else True
    stop = min(first, 3)
    simulate(split, stop)
    simulate(split, 4, "--resume", str(split))
    a = load_file(whole / "adapter" / "adapter_model.safetensors")
    b = load_file(split / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    split_rows = [json.loads(l) for l in (split / "history.jsonl").read_text().splitlines()]
    assert ([r.get("rejected-round", 0) for r in split_rows]
            == [r.get("rejected-round", 0) for r in rows])
    assert [r["eval-loss"] for r in split_rows] == [r["eval-loss"] for r in rows]
