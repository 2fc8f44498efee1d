"""node-config 'data-path': a SuperNode trains on its own files instead of a partition."""

from __future__ import annotations

import json

import pytest

from common.node_data import local_examples
from tests.conftest import write_records


def test_a_folder_of_files_is_read_together(tiny_cfg, tokenizer, tmp_path):
    tmp_path = tmp_path / "mine"
    tmp_path.mkdir()
    write_records(tmp_path / "a.jsonl", categories=("x",), per_category=5)
    chat = [{"messages": [{"role": "user", "content": f"q{i}"},
                          {"role": "assistant", "content": f"a{i}"}]} for i in range(3)]
    (tmp_path / "b.json").write_text(json.dumps(chat))
    (tmp_path / "notes.txt").write_text("not data")  # other files are ignored
    with pytest.raises(ValueError, match="its files differ in columns"):  # one format per node
        local_examples(tiny_cfg, str(tmp_path), tokenizer)
    (tmp_path / "b.json").unlink()
    write_records(tmp_path / "b.jsonl", categories=("y",), per_category=4)
    assert len(local_examples(tiny_cfg, str(tmp_path), tokenizer)) == 9
    assert len(local_examples(tiny_cfg.replace(max_examples_per_client=6), str(tmp_path),
                              tokenizer)) == 6


def test_a_missing_or_empty_folder_is_a_clear_error(tiny_cfg, tokenizer, tmp_path):
    with pytest.raises(ValueError, match=r"data-path '/nowhere/x' does not exist on this "
                                         r"SuperNode: mount .* \(docker: a volume at /nowhere/x\)"):
        local_examples(tiny_cfg, "/nowhere/x", tokenizer)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no .jsonl/.json/.csv/.parquet file"):
        local_examples(tiny_cfg, str(tmp_path / "empty"), tokenizer)
