"""Evaluation data of one's own (--eval-dataset), evaluation off (--eval-examples 0),
the 'auto' category default, and the partition-column hint."""

import json
import os

import pytest

from common.config import WORDNET_CATEGORIES, RunConfig
from common.data import eval_split, heldout_examples, load_run_data
from common.model import get_model
from server.cli import main
from server.summary import print_summary
from tests.conftest import write_records
from tests.test_centralized import _history
from tests.test_cli import fedtune
from tests.test_tools import run_rounds, scaled_adapter


def _eval_file(path, n=7):
    rows = [{"instruction": f"Test question {i}?", "output": f"Test answer {i}."} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# --- --eval-dataset --------------------------------------------------------------------
def test_eval_dataset_is_evaluated_and_no_training_record_is_held_out(tiny_cfg, tmp_path, tokenizer):
    cfg = tiny_cfg.replace(eval_dataset=str(_eval_file(tmp_path / "test.jsonl")), eval_examples=5)
    data = load_run_data(cfg, 2)
    assert len(data.heldout) == 0
    assert len(data.train_pool) == 60, "every training record goes to the clients"
    assert sum(len(data.partition(p)) for p in range(2)) == 60
    records, fmt = eval_split(cfg)
    assert fmt == "instruction" and len(records) == 5  # eval-examples of its 7 records
    assert all(r["instruction"].startswith("Test question") for r in records)
    examples = heldout_examples(cfg, 2, tokenizer)
    assert len(examples) == 5
    assert len(heldout_examples(cfg.replace(eval_examples=100), 2, tokenizer)) == 7, "all when fewer"
    # without it, eval-examples records of the training file are held out
    assert len(load_run_data(tiny_cfg, 2).train_pool) == 60 - tiny_cfg.eval_examples


def test_eval_dataset_is_validated_like_dataset(tiny_cfg, tmp_path, tokenizer):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "q", "answer": "a"}) + "\n")
    with pytest.raises(ValueError, match="bad.jsonl' has columns"):
        heldout_examples(tiny_cfg.replace(eval_dataset=str(bad)), 2, tokenizer)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        heldout_examples(tiny_cfg.replace(eval_dataset=str(tmp_path / "nope.jsonl")), 2, tokenizer)
    with pytest.raises(ValueError, match="'eval-examples' is 0"):
        tiny_cfg.replace(eval_dataset=str(bad), eval_examples=0)


def test_evaluate_defaults_to_the_runs_eval_dataset(tiny_cfg, tmp_path, capsys):
    cfg = tiny_cfg.replace(eval_dataset=str(_eval_file(tmp_path / "test.jsonl")), eval_examples=4)
    run = run_rounds(cfg, [scaled_adapter(get_model(cfg), 1, 0.3)])
    assert main(["evaluate", "--adapter", str(run.path), "--json"]) == 0
    got = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert got["data"] == f"the run's eval-dataset '{cfg.eval_dataset}'"
    assert got["examples"] == 4
    assert got["loss"] == pytest.approx(run.history()[1]["eval-loss"], rel=1e-5)
    # no training record is in it, so its size may change
    assert main(["evaluate", "--adapter", str(run.path), "--eval-examples", "7", "--json"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["examples"] == 7


# --- evaluation off --------------------------------------------------------------------
def test_evaluation_off_holds_nothing_out_and_summarises_without_perplexity(tiny_cfg, tokenizer,
                                                                           capsys):
    cfg = tiny_cfg.replace(eval_examples=0)
    assert len(load_run_data(cfg, 2).train_pool) == 60
    assert heldout_examples(cfg, 2, tokenizer) == []
    model = get_model(cfg)
    run = run_rounds(cfg, [scaled_adapter(model, 1, 0.3), scaled_adapter(model, 2, 0.3)])
    history = run.history()
    assert [r["round"] for r in history] == [0, 1, 2]
    assert not any(k.startswith("eval-") for r in history for k in r)
    assert history[2]["train-loss"] > 0
    assert os.readlink(run.path / "adapter") == "adapters/round-2"
    assert not (run.path / "best").exists(), "no round is best when none was evaluated"
    assert run.rewind(1) == float("inf") and not (run.path / "best").exists()
    print_summary(run.path, 1.0, "Hi")
    out = capsys.readouterr().out
    assert "evaluation off" in out and "no best" in out
    assert "perplexity" not in out and "eval loss" not in out
    assert all("evaluation off" in line for line in (run.path / "run.log").read_text().splitlines()
               if line.startswith("fedtune | round"))
    with pytest.raises(ValueError, match="evaluation off"):
        from server.tools import run_evaluate

        run_evaluate(_evaluate_args(run.path))


def _evaluate_args(adapter):
    from server.cli import parse_args

    return parse_args(["evaluate", "--adapter", str(adapter)])


def test_train_with_evaluation_off_and_with_an_eval_dataset(tiny_model_dir, tiny_dataset, tmp_path):
    common = ["--model", str(tiny_model_dir), "--dataset", str(tiny_dataset),
              "--num-clients", "2", "--num-server-rounds", "1", "--local-steps", "1",
              "--batch-size", "4", "--max-length", "64", "--lora-r", "4"]
    off = fedtune("train", *common, "--eval-examples", "0", "--run-dir", str(tmp_path / "off"))
    assert off.returncode == 0, off.stderr[-3000:]
    assert "centralized: 60 examples" in off.stdout, "nothing held out"
    assert "evaluation off (eval-examples 0)" in off.stdout and "perplexity" not in off.stdout
    assert not (tmp_path / "off" / "best").exists()
    assert {p.name for p in (tmp_path / "off" / "plots").iterdir()} == {
        "loss.png", "clients.png", "traffic.png"}
    test = _eval_file(tmp_path / "test.jsonl")
    own = fedtune("train", *common, "--eval-dataset", str(test), "--run-dir", str(tmp_path / "own"))
    assert own.returncode == 0, own.stderr[-3000:]
    assert "centralized: 60 examples" in own.stdout, "nothing held out"
    assert "held-out perplexity" in own.stdout
    assert os.readlink(tmp_path / "own" / "best") == "adapters/round-1"
    assert all("eval-loss" in r for r in _history(tmp_path / "own"))


# --- categories 'auto' and the missing-column hint ---------------------------------------
def test_category_default_applies_to_the_builtin_dataset_only():
    assert RunConfig().categories == "auto"
    assert RunConfig().category_list == WORDNET_CATEGORIES.split(",")
    assert RunConfig(dataset="mine.jsonl").category_list == []
    assert RunConfig(dataset="mine.jsonl", categories="a,b").category_list == ["a", "b"]
    assert RunConfig(categories="").category_list == []


def test_own_file_without_category_column_needs_no_categories_flag(tmp_path):
    path = tmp_path / "plain.jsonl"
    path.write_text("".join(json.dumps({"instruction": f"q{i}", "output": "a"}) + "\n"
                            for i in range(20)))
    data = load_run_data(RunConfig(dataset=str(path), partitioner="iid", num_clients=2,
                                   eval_examples=4), 2)
    assert len(data.train_pool) == 16


@pytest.mark.parametrize("flags, fix", [
    (dict(partitioner="iid", categories="a"), "or --categories ''"),
    (dict(partitioner="natural"), "or --partitioner iid"),
    (dict(partitioner="dirichlet", categories="a"), "or --partitioner iid --categories ''"),
])
def test_missing_column_hint_names_only_what_is_missing(tmp_path, flags, fix):
    path = tmp_path / "plain.jsonl"
    path.write_text("".join(json.dumps({"instruction": f"q{i}", "output": "a"}) + "\n"
                            for i in range(20)))
    with pytest.raises(ValueError) as info:
        load_run_data(RunConfig(dataset=str(path), num_clients=2, eval_examples=4, **flags), 2)
    message = str(info.value)
    assert "has no column 'category' (partition-by)" in message
    assert message.endswith(fix)
    if flags["partitioner"] == "iid":
        assert "--partitioner iid" not in message, "the flag was already given"
    if "categories" not in flags:
        assert "--categories" not in message, "no category filter is set"


def test_cli_hint_for_an_own_file_with_partitioner_iid(tiny_model_dir, tmp_path):
    """The issue's case: --partitioner iid given, the column missing, and (now) no
    category filter unless asked for."""
    path = write_records(tmp_path / "d.jsonl")
    path.write_text(path.read_text().replace('"category"', '"topic"'))
    common = ["simulate", "--model", str(tiny_model_dir), "--dataset", str(path),
              "--partitioner", "iid", "--run-dir", str(tmp_path / "run")]
    result = fedtune(*common, "--categories", "alpha")
    assert result.returncode == 2
    assert result.stderr.strip().endswith("set --partition-by to an existing column, or "
                                          "--categories ''"), result.stderr
