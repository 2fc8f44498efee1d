"""The token cache (common/token_cache.py): a split read back equals the split tokenized,
a hit never loads the raw data, and any change to what the tokens depend on misses."""

import json

import pytest

from common import data
from common.config import RunConfig
from common.datacheck import data_report
from common.token_cache import cache_folder, split_key
from tests.conftest import write_records


@pytest.fixture()
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDTUNE_TOKEN_CACHE", str(tmp_path / "tokens"))
    data.partition_examples.cache_clear()
    data.heldout_examples.cache_clear()
    yield tmp_path / "tokens"
    data.partition_examples.cache_clear()
    data.heldout_examples.cache_clear()


def _cfg(path, **kw):
    return RunConfig(**{"dataset": str(path), "categories": "", "eval_examples": 6,
                        "num_clients": 2, "max_length": 64, "seed": 0, **kw})


def _no_load(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the raw dataset was loaded on a cache hit")
    monkeypatch.setattr(data, "_load_run_data", refuse)


def test_cached_splits_equal_the_tokenized_ones_and_skip_loading(cache, tmp_path, tokenizer,
                                                                 monkeypatch):
    path = write_records(tmp_path / "d.jsonl", per_category=12)
    cfg = _cfg(path)
    monkeypatch.setenv("FEDTUNE_TOKEN_CACHE", "0")
    fresh = [data.partition_split(cfg, p, 2, tokenizer) for p in range(2)]
    fresh_held = data.heldout_split(cfg, 2, tokenizer)
    assert not cache.exists()  # off: nothing written
    monkeypatch.setenv("FEDTUNE_TOKEN_CACHE", str(cache))
    report = data_report(cfg, tokenizer)  # the preflight writes every split
    assert len(list(cache.glob("*.npz"))) == 4  # load, held-out, 2 partitions
    _no_load(monkeypatch)
    for p in range(2):
        examples, stats = data.partition_split(cfg, p, 2, tokenizer)
        assert examples == fresh[p][0] and stats == fresh[p][1]
        assert report.splits[f"client {p}"] == stats
    assert data.heldout_split(cfg, 2, tokenizer) == fresh_held
    assert data.partition_examples(cfg, 1, 2, tokenizer) == fresh[1][0]
    assert data_report(cfg, tokenizer).to_json() == report.to_json()


def test_dropped_records_and_their_reasons_survive_the_cache(cache, tmp_path, tokenizer):
    path = write_records(tmp_path / "d.jsonl", per_category=12)
    cfg = _cfg(path, max_length=51)  # examples are 51 or 52 tokens: some dropped
    built = data.partition_split(cfg, 0, 2, tokenizer)
    assert built[1].dropped and built[1].dropped_reasons
    assert data.partition_split(cfg, 0, 2, tokenizer) == built


def test_what_the_tokens_depend_on_changes_the_key(cache, tmp_path, tokenizer):
    path = write_records(tmp_path / "d.jsonl", per_category=12)
    cfg = _cfg(path)
    key = split_key(cfg, "partition 0 of 2", tokenizer)
    assert split_key(cfg, "partition 1 of 2", tokenizer) != key
    assert split_key(cfg.replace(max_length=63), "partition 0 of 2", tokenizer) != key
    assert split_key(cfg.replace(seed=1), "partition 0 of 2", tokenizer) != key
    # where the run writes is not what it reads
    assert split_key(cfg.replace(run_dir=str(tmp_path / "elsewhere")), "partition 0 of 2",
                     tokenizer) == key
    # same size, same file, other content: a rewrite is never served stale
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    rows[0]["output"] = rows[0]["output"].replace("Item", "Itex")
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert split_key(cfg, "partition 0 of 2", tokenizer) != key


def test_an_edited_file_is_tokenized_again(cache, tmp_path, tokenizer):
    path = write_records(tmp_path / "d.jsonl", per_category=12)
    cfg = _cfg(path)
    before = data.heldout_split(cfg, 2, tokenizer)[0]
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    for row in rows:
        row["output"] = "Something else entirely, " + row["output"]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    data._load_run_data.cache_clear()
    after = data.heldout_split(cfg, 2, tokenizer)[0]
    assert after != before and len(after) == len(before)


def test_a_damaged_entry_is_rebuilt(cache, tmp_path, tokenizer):
    path = write_records(tmp_path / "d.jsonl", per_category=12)
    cfg = _cfg(path)
    built = data.partition_split(cfg, 0, 2, tokenizer)
    (entry,) = cache.glob("*.npz")
    entry.write_bytes(b"not a numpy file")
    assert data.partition_split(cfg, 0, 2, tokenizer) == built
    assert entry.read_bytes().startswith(b"PK")  # rewritten as a numpy archive


def test_errors_are_not_cached(cache, tmp_path, tokenizer):
    path = write_records(tmp_path / "d.jsonl", per_category=12)
    cfg = _cfg(path, max_length=4)  # nothing fits
    for _ in range(2):
        with pytest.raises(ValueError, match="no usable records"):
            data.partition_split(cfg, 0, 2, tokenizer)
    assert not list(cache.glob("*.npz"))


def test_hub_datasets_are_not_cached(tmp_path, tokenizer):
    cfg = RunConfig(dataset="someone/some-dataset")
    assert split_key(cfg, "partition 0 of 4", tokenizer) is None
    assert cache_folder().name  # the folder exists as a setting even when unused


def test_a_saved_dataset_folder_keeps_its_key_when_datasets_adds_cache_files(cache, tmp_path,
                                                                            tokenizer):
    import datasets

    rows = [json.loads(line) for line in
            write_records(tmp_path / "d.jsonl", per_category=12).read_text().splitlines()]
    folder = tmp_path / "saved"
    datasets.Dataset.from_list(rows).save_to_disk(str(folder))
    cfg = _cfg(folder)
    key = split_key(cfg, "partition 0 of 2", tokenizer)
    (folder / "cache-0123456789abcdef.arrow").write_bytes(b"what a filter wrote")
    assert split_key(cfg, "partition 0 of 2", tokenizer) == key
    (folder / "data-00000-of-00001.arrow").write_bytes(b"other data")
    assert split_key(cfg, "partition 0 of 2", tokenizer) != key


@pytest.mark.parametrize("damage", [
    lambda b: b"",  # empty (a crash before the write finished)
    lambda b: b[: len(b) // 2],  # truncated
    lambda b: b[:200] + bytes([b[200] ^ 0xFF]) + b[201:],  # one byte flipped
])
def test_any_damage_is_rebuilt_not_raised(cache, tmp_path, tokenizer, damage):
    path = write_records(tmp_path / "d.jsonl", per_category=12)
    cfg = _cfg(path)
    built = data.partition_split(cfg, 0, 2, tokenizer)
    (entry,) = cache.glob("*.npz")
    entry.write_bytes(damage(entry.read_bytes()))
    assert data.partition_split(cfg, 0, 2, tokenizer) == built


def test_arrays_that_disagree_with_their_counts_are_rebuilt(cache, tmp_path, tokenizer):
    import numpy as np

    path = write_records(tmp_path / "d.jsonl", per_category=12)
    cfg = _cfg(path)
    built = data.partition_split(cfg, 0, 2, tokenizer)
    (entry,) = cache.glob("*.npz")
    with np.load(entry) as z:
        arrays = dict(z)
    arrays["input_ids"] = arrays["input_ids"][:-3]  # shorter than the lengths say
    np.savez(entry, **arrays)
    assert data.partition_split(cfg, 0, 2, tokenizer) == built


def test_the_special_tokens_are_part_of_the_key(cache, tokenizer, tmp_path):
    path = write_records(tmp_path / "d.jsonl", per_category=12)
    cfg = _cfg(path)
    key = split_key(cfg, "partition 0 of 2", tokenizer)
    from common import token_cache

    eos = tokenizer.eos_token
    try:
        tokenizer.eos_token = "<|endoftext|>"
        token_cache._TOKENIZER_IDS.clear()
        assert split_key(cfg, "partition 0 of 2", tokenizer) != key
    finally:
        tokenizer.eos_token = eos
        token_cache._TOKENIZER_IDS.clear()
    assert split_key(cfg, "partition 0 of 2", tokenizer) == key


def test_a_bad_size_limit_is_one_line_naming_the_variable(cache, tmp_path, tokenizer,
                                                          monkeypatch):
    path = write_records(tmp_path / "d.jsonl", per_category=12)
    monkeypatch.setenv("FEDTUNE_TOKEN_CACHE_MB", "1GB")
    with pytest.raises(ValueError, match="FEDTUNE_TOKEN_CACHE_MB='1GB' is not a number"):
        data.partition_split(_cfg(path), 0, 2, tokenizer)
    assert not cache.exists()  # refused before any work


@pytest.mark.parametrize("value", ["0", "off", "False", "no"])
def test_words_for_off_turn_it_off(value, monkeypatch, tokenizer, tmp_path):
    monkeypatch.setenv("FEDTUNE_TOKEN_CACHE", value)
    assert split_key(_cfg(write_records(tmp_path / "d.jsonl")), "x", tokenizer) is None
