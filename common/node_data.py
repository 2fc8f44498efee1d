"""A SuperNode's own data (node-config 'data-path'; docs/deployment.md): the node's
private files instead of a partition of the run's dataset, through the same file
loader, record formats and tokenization as ``dataset`` (common/data.py)."""

from __future__ import annotations

import functools
from pathlib import Path

from common.config import RunConfig
from common.data import (
    _FILE_SUFFIXES, _first_line, _load_file, class_labels, classification_format, detect_format,
    load_dataset_any, tokenize_classification, tokenize_dataset,
)

# A datasets.save_to_disk folder holds one of these; any other folder is a set of files.
_SAVED_DATASET_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")


@functools.lru_cache(maxsize=4)
def local_examples(cfg: RunConfig, data_path: str, tokenizer) -> list[dict]:
    """The tokenized training examples of one node's private data, instead of a partition.

    ``data_path`` is a data file, a ``datasets.save_to_disk`` folder, or a folder whose
    .jsonl/.json/.csv/.parquet files are read together, through the same file loader
    and record formats as ``dataset``. Built once per process.
    """
    import datasets

    path = Path(data_path).expanduser()
    if not path.exists():
        raise ValueError(
            f"data-path '{data_path}' does not exist on this SuperNode: mount the node's "
            f"data folder there (docker: a volume at {data_path}) or fix the node-config "
            "'data-path'")
    if path.is_dir() and not any((path / m).exists() for m in _SAVED_DATASET_MARKERS):
        files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix in _FILE_SUFFIXES)
        if not files:
            raise ValueError(
                f"data-path '{data_path}' holds no {'/'.join(_FILE_SUFFIXES)} file: put the "
                "node's records there")
        parts = [_load_file(f) for f in files]
        columns = {f.name: sorted(p.column_names) for f, p in zip(files, parts)}
        if len({tuple(c) for c in columns.values()}) > 1:
            raise ValueError(f"data-path '{data_path}': its files differ in columns ({columns}): "
                             "use one record format for all of a node's files")
        try:
            ds = datasets.concatenate_datasets(parts)
        except ValueError as err:  # same columns, other types (e.g. int vs string)
            raise ValueError(f"data-path '{data_path}': its files do not fit one table "
                             f"({_first_line(err)}): give each field one type") from None
    else:
        ds = load_dataset_any(str(path))
    if cfg.max_examples_per_client and len(ds) > cfg.max_examples_per_client:
        ds = ds.select(range(cfg.max_examples_per_client))
    if cfg.task == "classification":
        fmt = classification_format(ds.column_names, cfg.text_column, cfg.label_column, data_path)
        return tokenize_classification(ds, fmt, class_labels(cfg), tokenizer, cfg.max_length)
    fmt = detect_format(ds.column_names, cfg.data_format, data_path)
    return tokenize_dataset(ds, fmt, tokenizer, cfg.max_length, truncation=cfg.truncation,
                            on_bad_record=cfg.on_bad_record)
