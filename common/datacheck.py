"""What a run's data becomes, before any training: counts per split and per client, and
examples rendered with their trained spans marked.

Training's own path (``load_run_data``, ``RunData.partition``, ``tokenize_records``)
computes everything here, so ``fedtune data``, the preflight of ``fedtune simulate`` /
``train`` and the clients agree by construction.
"""

from __future__ import annotations

from dataclasses import dataclass

from common.chat import IGNORE_INDEX, encode_chat
from common.config import RunConfig
from common.records import WHERE, DataStats

STATS_FILE = "data-stats.json"
_GREEN, _RESET = "\033[32m", "\033[0m"


@dataclass
class DataReport:
    """``splits``: 'held-out', 'validation' (when early stopping uses it) and
    'client N' for every partition, each a ``DataStats``; ``skipped``: the bad records
    left out at load under on-bad-record 'skip', as (where, reason)."""

    splits: dict
    skipped: tuple

    def lines(self, *, where: str = " (see run.log)") -> list[str]:
        out = [f"{name}: {stats.line()}" for name, stats in self.splits.items()]
        if self.skipped:
            n = len(self.skipped)
            out.append(f"{n} record{'s' if n != 1 else ''} skipped{where}")
        return out

    def to_json(self) -> dict:
        return {"splits": {name: s.summary() for name, s in self.splits.items()},
                "skipped": [{"where": w, "reason": r} for w, r in self.skipped],
                "dropped": {name: [{"where": w, "reason": r} for w, r in s.dropped_reasons]
                            for name, s in self.splits.items() if s.dropped_reasons}}


def data_report(cfg: RunConfig, tokenizer) -> DataReport:
    """Load, split and tokenize the run's data once, as training will (each split through
    the token cache, which the clients and the server then read: common/token_cache.py).

    Raises ValueError (one line, naming the partition and the fix) for a partition that
    cannot be drawn, is empty, or has no usable example.
    """
    if cfg.task == "classification":
        return _classification_report(cfg, tokenizer)
    from common.data import heldout_split, load_skipped, partition_split, validation_split

    skipped = load_skipped(cfg, tokenizer)  # loads and checks the data on a cache miss
    splits: dict[str, DataStats] = {}
    parts = []  # (name, stats of the split)
    if cfg.eval_dataset or cfg.evaluates:
        parts.append(("eval-dataset" if cfg.eval_dataset else "held-out",
                      lambda: heldout_split(cfg, cfg.num_clients, tokenizer)))
    if cfg.uses_validation and cfg.validation_examples:
        parts.append(("validation", lambda: validation_split(cfg, tokenizer)))
    for partition_id in range(cfg.num_clients):
        parts.append((f"client {partition_id}",
                      lambda p=partition_id: partition_split(cfg, p, cfg.num_clients, tokenizer)))
    for name, split in parts:
        try:
            splits[name] = split()[1]
        except ValueError as err:
            label = name.replace("client", "partition")
            raise ValueError(f"{label}: {err}") from None
    skipped = skipped + tuple(item for stats in splits.values() for item in stats.skipped)
    return DataReport(splits=splits, skipped=skipped)


def _classification_report(cfg: RunConfig, tokenizer) -> DataReport:
    from common.data import _tokenize, eval_split, load_run_data

    data = load_run_data(cfg, cfg.num_clients)
    parts = []  # (name, records, format)
    if cfg.eval_dataset:  # the server evaluates on its own file; nothing held out of dataset
        records, fmt = eval_split(cfg)
        parts.append(("eval-dataset", records, fmt))
    elif cfg.evaluates:
        parts.append(("held-out", data.heldout, data.fmt))
    if len(data.validation):
        parts.append(("validation", data.validation, data.fmt))
    for partition_id in range(cfg.num_clients):
        parts.append((f"client {partition_id}",
                      data.partition(partition_id, cfg.max_examples_per_client), data.fmt))
    splits: dict[str, DataStats] = {}
    for name, ds, fmt in parts:
        try:  # one label per example: nothing to cut or mark
            examples = _tokenize(cfg, data, ds, tokenizer, fmt=fmt)
        except ValueError as err:
            label = name.replace("client", "partition")
            raise ValueError(f"{label}: {err}") from None
        splits[name] = DataStats(records=len(ds), kept=len(examples),
                                 lengths=[len(e["input_ids"]) for e in examples])
    return DataReport(splits=splits, skipped=tuple(data.skipped))


def first_examples(cfg: RunConfig, tokenizer, count: int) -> list[dict]:
    """The first ``count`` good records of ``cfg.dataset`` in file order, encoded as
    training encodes them: ``{"where", "status", "example"}``."""
    from common.data import detect_format, load_dataset_any, to_messages

    ds = load_dataset_any(cfg.dataset)
    fmt = detect_format(ds.column_names, cfg.data_format, cfg.dataset)
    shown = []
    for record in ds:
        if len(shown) >= count:
            break
        try:
            encoded = encode_chat(to_messages(record, fmt), tokenizer, cfg.max_length,
                                  truncation=cfg.truncation)
        except ValueError:
            continue  # reported in the counts
        shown.append({"where": record.get(WHERE, ""), "status": encoded.status,
                      "example": encoded.example})
    return shown


def marked_text(example: dict | None, tokenizer, *, color: bool) -> str:
    """The example's tokens as text, each trained span in green (``color``) or in
    ``[[ ]]``; special tokens are shown as their text."""
    if example is None:
        return "(dropped)"
    pieces, run, trained = [], [], None
    for token, label in zip(example["input_ids"], example["labels"]):
        is_trained = label != IGNORE_INDEX
        if trained is not None and is_trained != trained:
            pieces.append(_mark(tokenizer.decode(run), trained, color))
            run = []
        run.append(token)
        trained = is_trained
    if run:
        pieces.append(_mark(tokenizer.decode(run), trained, color))
    return "".join(pieces)


def _mark(text: str, trained: bool, color: bool) -> str:
    if not trained:
        return text
    return f"{_GREEN}{text}{_RESET}" if color else f"[[{text}]]"
