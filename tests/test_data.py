import json
from pathlib import Path

import pytest

from common.config import RunConfig
from common.data import (
    WORDNET_DIR, load_dataset_any, load_run_data, tokenize_dataset, wordnet_records,
)
from tests.conftest import write_records


def _cfg(path, **kw):
    base = dict(dataset=str(path), categories="", eval_examples=10, seed=0)
    base.update(kw)
    return RunConfig(**base)


def _ids(ds):
    return [r["instruction"] for r in ds]


def test_natural_partitioner_gives_one_category_per_client(tmp_path):
    path = write_records(tmp_path / "d.jsonl", categories=("a", "b", "c"), per_category=20)
    data = load_run_data(_cfg(path, num_clients=3), 3)
    cats = [set(data.partition(i)["category"]) for i in range(3)]
    assert all(len(c) == 1 for c in cats)
    assert set.union(*cats) == {"a", "b", "c"}
    assert sum(len(data.partition(i)) for i in range(3)) == 60 - 10


def test_iid_partitioner_is_disjoint_and_balanced(tmp_path):
    path = write_records(tmp_path / "d.jsonl", categories=("a", "b"), per_category=25)
    data = load_run_data(_cfg(path, partitioner="iid", num_clients=4, min_train_clients=2), 4)
    parts = [_ids(data.partition(i)) for i in range(4)]
    assert sorted(len(p) for p in parts) in ([10, 10, 10, 10],)
    assert len(set().union(*map(set, parts))) == 40
    assert not set(_ids(data.heldout)) & set().union(*map(set, parts))


def test_dirichlet_partitioner_covers_the_pool_without_overlap(tmp_path):
    path = write_records(tmp_path / "d.jsonl", categories=("a", "b", "c"), per_category=40)
    data = load_run_data(_cfg(path, partitioner="dirichlet", dirichlet_alpha=0.3,
                              num_clients=3), 3)
    parts = [_ids(data.partition(i)) for i in range(3)]
    flat = [x for p in parts for x in p]
    assert len(flat) == len(set(flat)) == 110


def test_more_clients_than_categories_is_refused(tmp_path):
    path = write_records(tmp_path / "d.jsonl", categories=("a", "b"))
    with pytest.raises(ValueError, match="gives 2 clients but 3 were asked for"):
        load_run_data(_cfg(path, num_clients=3), 3)


def test_categories_filter_and_unknown_category(tmp_path):
    path = write_records(tmp_path / "d.jsonl", categories=("a", "b", "c"))
    data = load_run_data(_cfg(path, categories="a,c", num_clients=2), 2)
    assert set(data.train_pool["category"]) == {"a", "c"}
    with pytest.raises(ValueError, match=r"categories \['zz'\] are not values"):
        load_run_data(_cfg(path, categories="a,zz", num_clients=2), 2)


@pytest.mark.parametrize("name, content, message", [
    ("empty.jsonl", "", "is empty"),
    ("bad.jsonl", '{"instruction": "x", "output": "y"}\nnot json\n', "line 2 is not JSON"),
    ("bad.json", "{oops", "is not JSON"),
    ("latin1.jsonl", None, "is not UTF-8"),
])
def test_malformed_files_name_the_file(tmp_path, name, content, message):
    path = tmp_path / name
    if content is None:
        path.write_bytes('{"instruction": "caf\xe9"}\n'.encode("latin-1"))
    else:
        path.write_text(content)
    with pytest.raises(ValueError, match=message) as info:
        load_dataset_any(str(path))
    assert name in str(info.value)


def test_missing_file_and_wrong_fields(tmp_path, tokenizer):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_dataset_any(str(tmp_path / "nope.jsonl"))
    path = tmp_path / "fields.jsonl"
    path.write_text(json.dumps({"question": "q", "answer": "a", "category": "x"}) * 1 + "\n")
    with pytest.raises(ValueError, match="expected 'instruction'"):
        load_run_data(_cfg(path, eval_examples=1, partitioner="iid", num_clients=2), 2)
    path.write_text("".join(json.dumps({"instruction": "q", "output": "" if i == 3 else "a"}) + "\n"
                            for i in range(5)))
    ds = load_dataset_any(str(path))
    with pytest.raises(ValueError, match="fields.jsonl' line 4: an instruction record needs non-empty"):
        tokenize_dataset(ds, "instruction", tokenizer, 64)


def test_chat_records_train_the_assistant_turn(tmp_path, tokenizer):
    path = tmp_path / "chat.jsonl"
    rows = [{"messages": [{"role": "user", "content": "hi"},
                          {"role": "assistant", "content": f"hello {i}"}]} for i in range(3)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    examples = tokenize_dataset(load_dataset_any(str(path)), "chat", tokenizer, 64)
    labels = [t for t in examples[1]["labels"] if t != -100]
    assert tokenizer.decode(labels).startswith("hello 1")


@pytest.mark.skipif(not (WORDNET_DIR / "data.noun").exists(),
                    reason="Debian's wordnet-base is not installed (apt-get install wordnet-base)")
def test_wordnet_records_are_definitions_with_categories():
    records = wordnet_records()
    assert len(records) > 100_000
    dog = next(r for r in records if r["instruction"] == "Define the word 'dog' (noun).")
    assert dog["category"] == "noun.animal"
    assert "domesticated" in dog["output"].lower() or "canis" in dog["output"].lower()
    assert {r["category"] for r in records} >= {"noun.food", "noun.plant", "verb.motion"}
