"""Meta-learning's test: tasks held out of the run, and the k-shot episodes on them."""

from __future__ import annotations

import re

import pytest
import torch

from common.config import RunConfig
from common.data import WORDNET_DIR, heldout_examples, load_run_data
from common.meta import check_unseen, episodes, kshot_report
from tests.conftest import write_records
from tests.test_cli import fedtune

UNSEEN = "noun.artifact,verb.motion,noun.person"


@pytest.mark.skipif(not (WORDNET_DIR / "data.noun").exists(),
                    reason="WordNet (apt wordnet-base) not installed")
def test_unseen_wordnet_tasks_are_in_no_partition_no_heldout_no_validation():
    # all categories kept except the three unseen tasks; a validation split is drawn
    cfg = RunConfig(categories="", partitioner="iid", num_clients=4, eval_examples=200,
                    early_stopping_patience=1, validation_examples=200,
                    meta_test_categories=UNSEEN)
    data = load_run_data(cfg, 4)
    unseen = set(UNSEEN.split(","))
    seen = [set(data.heldout["category"]), set(data.validation["category"])]
    seen += [set(data.partition(i)["category"]) for i in range(4)]
    assert all(s and not s & unseen for s in seen)
    # ... and without the key they would be there: the test can fail
    everything = load_run_data(cfg.replace(meta_test_categories=""), 4)
    assert unseen <= set(everything.train_pool["category"])
    assert len(everything.train_pool) > len(data.train_pool)


def test_meta_test_categories_errors_name_the_fix(tmp_path):
    path = write_records(tmp_path / "d.jsonl", categories=("a", "b", "c"))
    cfg = RunConfig(dataset=str(path), categories="a,b", num_clients=2, eval_examples=4)
    with pytest.raises(ValueError, match=r"\['b'\] are in both --categories .* --meta-test"):
        load_run_data(cfg.replace(meta_test_categories="b"), 2)
    with pytest.raises(ValueError, match=r"meta-test-categories \['zz'\] are not values"):
        load_run_data(cfg.replace(meta_test_categories="zz"), 2)
    data = load_run_data(cfg.replace(categories="", meta_test_categories="c"), 2)
    assert set(data.train_pool["category"]) | set(data.heldout["category"]) == {"a", "b"}


def test_check_unseen_refuses_trained_tasks(tmp_path):
    cfg = RunConfig(dataset="x.jsonl", categories="a,b")
    check_unseen(cfg, ["c"])
    with pytest.raises(ValueError, match="task 'a' is in the run's categories"):
        check_unseen(cfg, ["c", "a"])
    kept_all = RunConfig(dataset="x.jsonl", categories="", meta_test_categories="c")
    check_unseen(kept_all, ["c"])
    with pytest.raises(ValueError, match="task 'b' was not held out"):
        check_unseen(kept_all, ["b"])
    with pytest.raises(ValueError, match="trained on all of its data .* --meta-test-categories"):
        check_unseen(RunConfig(dataset="x.jsonl", categories=""), ["b"])


def _ids(examples):
    return [tuple(e["input_ids"]) for e in examples]


def test_episodes_are_disjoint_nested_and_seeded(tmp_path, tokenizer):
    path = write_records(tmp_path / "d.jsonl", categories=("a", "b", "c"), per_category=40)
    cfg = RunConfig(dataset=str(path), categories="a", max_length=64)
    eps = episodes(cfg, tokenizer, tasks=["b", "c"], shots=[8, 4, 16], query_examples=12,
                   seeds=[0, 1])
    assert [(e.task, e.seed) for e in eps] == [("b", 0), ("b", 1), ("c", 0), ("c", 1)]
    for ep in eps:
        query = set(_ids(ep.query))
        assert len(query) == 12 and sorted(ep.support) == [4, 8, 16]
        assert all(len(ep.support[k]) == k for k in ep.support)
        assert not query & set(_ids(ep.support[16]))  # disjoint
        assert _ids(ep.support[16])[:8] == _ids(ep.support[8])  # nested
        task = ep.task
        texts = tokenizer.batch_decode([e["input_ids"] for e in ep.query + ep.support[16]])
        assert all(f"group {task}." in t for t in texts)  # only the task's records
    again = episodes(cfg, tokenizer, tasks=["b"], shots=[4, 8, 16], query_examples=12, seeds=[1])
    assert _ids(again[0].query) == _ids(eps[1].query)  # same seed: same episode
    assert _ids(eps[0].query) != _ids(eps[1].query)  # another seed: another draw
    with pytest.raises(ValueError, match="task 'b' has 40 usable records, fewer than"):
        episodes(cfg, tokenizer, tasks=["b"], shots=[32], query_examples=12, seeds=[0])
    with pytest.raises(ValueError, match=r"unseen tasks \['zz'\] are not values"):
        episodes(cfg, tokenizer, tasks=["zz"], shots=[4], query_examples=4, seeds=[0])


def test_kshot_report_scores_before_and_after_and_restores_the_adapter(tiny_cfg, tokenizer):
    from common.model import adapter_state, get_model

    cfg = tiny_cfg.replace(categories="alpha", lr=0.05)
    model = get_model(cfg)
    start = {k: v.clone() for k, v in adapter_state(model).items()}
    eps = episodes(cfg, tokenizer, tasks=["beta"], shots=[4, 8], query_examples=8, seeds=[0])
    report = kshot_report(cfg, start, eps, steps=3, model=model, tokenizer=tokenizer)
    assert [(r["k"]) for r in report.rows] == [0, 4, 8]
    assert all(torch.equal(v, start[k]) for k, v in adapter_state(model).items())
    from common.train import evaluate

    before = evaluate(model, eps[0].query, batch_size=8, pad_token_id=tokenizer.pad_token_id).loss
    assert report.rows[0]["query-loss"] == before
    # adapting moved the model: each k's loss differs from the unadapted one
    assert all(r["query-loss"] != before for r in report.rows[1:])
    assert report.curve()[4] == (report.rows[1]["query-loss"], 0.0)


def test_personalize_on_unseen_tasks_prints_the_curve(tiny_model_dir, tmp_path):
    data = write_records(tmp_path / "d.jsonl", categories=("a", "b", "c"), per_category=30)
    run = tmp_path / "run"
    common = ["--model", str(tiny_model_dir), "--dataset", str(data), "--categories", "",
              "--meta-test-categories", "c", "--num-clients", "2", "--num-server-rounds", "1",
              "--local-steps", "1", "--batch-size", "4", "--eval-examples", "8",
              "--max-length", "64", "--lora-r", "4", "--dtype", "float32"]
    trained = fedtune("train", *common, "--run-dir", str(run))
    assert trained.returncode == 0, trained.stderr[-2000:]
    result = fedtune("personalize", str(run), "--shots", "4,8", "--seeds", "2", "--steps", "2",
                     "--query-examples", "8")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "unseen tasks c: 2 seeds each" in result.stdout
    assert "2 adaptation steps at lr 0.0003" in result.stdout  # 0.3 x the run's 1e-3
    assert [int(k) for k in re.findall(r"^k=(\d+)", result.stdout, re.M)] == [0, 4, 8]
    bad_lr = fedtune("personalize", str(run), "--adapt-lr", "-1")
    assert bad_lr.returncode == 2 and "--adapt-lr must be > 0" in bad_lr.stderr
    trained_on = fedtune("personalize", str(run), "--unseen-categories", "a")
    assert trained_on.returncode == 2
    assert "task 'a' was not held out" in trained_on.stderr.strip().splitlines()[-1]
    plain = tmp_path / "plain"  # no task held out: the k-shot flags have nothing to act on
    common_plain = [c for c in common if c not in ("--meta-test-categories", "c")]
    assert fedtune("train", *common_plain, "--num-clients", "3",
                   "--run-dir", str(plain)).returncode == 0
    ignored = fedtune("personalize", str(plain), "--shots", "4", "--seeds", "2")
    assert ignored.returncode == 2
    assert ignored.stderr.strip().splitlines()[-1].endswith(
        "--shots, --seeds set the k-shot protocol on unseen tasks, and "
        f"'{plain}' holds none out (no meta-test-categories): give --unseen-categories, or "
        "drop them")
