"""`fedtune train`: centralized and local-only baselines through the same loop."""

import json
import re

from server.centralized import EarlyStopping
from tests.test_cli import fedtune


def _history(run_dir):
    return [json.loads(l) for l in (run_dir / "history.jsonl").read_text().splitlines()]


def test_centralized_and_local_only_runs(tiny_model_dir, tiny_dataset, tmp_path):
    common = ["--model", str(tiny_model_dir), "--dataset", str(tiny_dataset), "--categories", "",
              "--num-clients", "2", "--num-server-rounds", "2", "--local-steps", "3",
              "--batch-size", "4", "--eval-examples", "8", "--max-length", "64", "--lora-r", "4"]
    pooled = fedtune("train", *common, "--run-dir", str(tmp_path / "c"))
    assert pooled.returncode == 0, pooled.stderr[-3000:]
    # 12 = 2 rounds x 2 clients x 3 local steps, what the federation takes in total
    # equal data: every training record (60 minus 8 held out); equal total steps
    assert "centralized: 52 examples, 12 steps" in pooled.stdout
    rows = _history(tmp_path / "c")
    assert [r["round"] for r in rows] == [0, 1, 2]
    assert rows[-1]["train-loss"] > 0 and (tmp_path / "c" / "adapter" / "adapter_config.json").exists()

    local = fedtune("train", *common, "--partition-id", "1", "--run-dir", str(tmp_path / "l"))
    assert local.returncode == 0, local.stderr[-3000:]
    found = re.search(r"local-only client 1: (\d+) examples, 6 steps", local.stdout)
    assert found and 0 < int(found.group(1)) < 52
    clients = [json.loads(l) for l in (tmp_path / "l" / "clients.jsonl").read_text().splitlines()]
    assert {c["partition-id"] for c in clients} == {1}

    bad = fedtune("train", *common, "--partition-id", "7", "--run-dir", str(tmp_path / "b"))
    assert bad.returncode == 2 and "--partition-id 7 is outside 0..1" in bad.stderr


def test_early_stopping_waits_for_patience():
    stopper = EarlyStopping(patience=2, best=3.0)
    assert [stopper.update(x) for x in (2.5, 2.6, 2.4, 2.45, 2.5)] == [False, False, False, False, True]
    assert not any(EarlyStopping(0, 1.0).update(9.0) for _ in range(5))  # 0 = off


def test_personalize_reports_before_and_after_per_client(tiny_model_dir, tiny_dataset, tmp_path):
    run = tmp_path / "run"
    common = ["--model", str(tiny_model_dir), "--dataset", str(tiny_dataset), "--categories", "",
              "--num-clients", "2", "--num-server-rounds", "1", "--local-steps", "1",
              "--batch-size", "4", "--eval-examples", "8", "--max-length", "64", "--lora-r", "4",
              "--lr", "0.01"]
    assert fedtune("train", *common, "--run-dir", str(run)).returncode == 0
    result = fedtune("personalize", str(run), "--k-steps", "4", "--support-examples", "8",
                     "--query-examples", "8")
    assert result.returncode == 0, result.stderr[-2000:]
    lines = re.findall(r"client (\d): query loss ([\d.]+) -> ([\d.]+)", result.stdout)
    assert [l[0] for l in lines] == ["0", "1"]
    # k steps on the client's own data lower its query loss (same distribution)
    assert all(float(after) < float(before) for _, before, after in lines), result.stdout
    too_small = fedtune("personalize", str(run), "--support-examples", "2")
    assert too_small.returncode == 2
    assert "--support-examples 2 is smaller than one batch" in too_small.stderr


def test_early_stopping_stops_a_diverging_run_on_its_validation_split(tiny_model_dir, tiny_dataset, tmp_path):
    run = tmp_path / "run"
    # lr 50 with no clipping blows the adapter up: the validation loss cannot improve
    result = fedtune("train", "--model", str(tiny_model_dir), "--dataset", str(tiny_dataset),
                     "--categories", "", "--num-clients", "2", "--num-server-rounds", "4",
                     "--local-steps", "2", "--batch-size", "4", "--eval-examples", "8",
                     "--validation-examples", "8", "--max-length", "64", "--lora-r", "4",
                     "--lr", "50", "--lr-schedule", "constant", "--max-grad-norm", "0", "--dtype", "float32",
                     "--early-stopping-patience", "1", "--run-dir", str(run))
    assert result.returncode == 0, result.stderr[-2000:]
    assert "early stop after round 1" in result.stdout
    assert [r["round"] for r in _history(run)] == [0, 1]
    # the validation split is carved out of the training pool: 60 - 8 - 8 records remain
    assert "centralized: 44 examples" in result.stdout


def test_validation_split_is_disjoint_from_heldout_and_pool(tiny_dataset):
    from common.config import RunConfig
    from common.data import load_run_data

    cfg = RunConfig(dataset=str(tiny_dataset), categories="", num_clients=2, eval_examples=8,
                    validation_examples=6, early_stopping_patience=2)
    data = load_run_data(cfg, 2)
    ids = lambda ds: {r["instruction"] for r in ds}  # noqa: E731
    assert len(data.validation) == 6 and len(data.heldout) == 8 and len(data.train_pool) == 46
    assert not ids(data.validation) & ids(data.heldout)
    assert not ids(data.validation) & ids(data.train_pool)
    assert len(load_run_data(cfg.replace(early_stopping_patience=0), 2).validation) == 0
