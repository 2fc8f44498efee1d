"""Records in, token batches out: sources, formats, partitions, tokenisation, collate.

Records are instruction (Alpaca: instruction/input/output) or chat (``messages``);
both are rendered with the tokenizer's chat template and only assistant turns carry a
label (every one of a chat, see ``common/chat.py``), so the loss never rewards
predicting the prompt. Every record keeps where it came from (``common/records.py``).
"""

from __future__ import annotations

import functools
import json
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch

from common.chat import IGNORE_INDEX, encode_chat, trains
from common.config import BUILTIN_DATASET, RunConfig
from common.wordnet import WORDNET_DIR, wordnet_records  # noqa: F401 (re-exported)
from common.records import (
    WHERE, DataStats, check_records, first_type_clash, read_csv_rows, read_text, with_where,
)
from common.token_cache import cached_split

log = logging.getLogger(__name__)
_FILE_SUFFIXES = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}


# --- sources -------------------------------------------------------------------------
def load_dataset_any(source: str):
    """A ``datasets.Dataset`` from the built-in name, a file, a folder, or the Hub."""
    import datasets

    if source == BUILTIN_DATASET:
        return with_where(datasets.Dataset.from_list(wordnet_records()), "built-in WordNet", "record")
    path = Path(source).expanduser()
    if path.is_dir():
        try:
            ds = datasets.load_from_disk(str(path))
        except FileNotFoundError as err:
            raise ValueError(
                f"dataset folder '{source}' is not a datasets.save_to_disk folder: {err}"
            ) from None
        return with_where(ds["train"] if isinstance(ds, datasets.DatasetDict) else ds, f"'{source}'")
    if path.suffix in _FILE_SUFFIXES:
        if not path.exists():
            raise FileNotFoundError(f"dataset file '{source}' does not exist")
        return _load_file(path)
    if path.exists() or source.startswith((".", "/", "~")):
        raise ValueError(
            f"dataset '{source}': unsupported file type; use .jsonl, .json, .csv, "
            ".parquet or a datasets.save_to_disk folder"
        )
    try:
        ds = datasets.load_dataset(source, split="train")
    except Exception as err:  # the Hub raises many types; the message is what matters
        raise ValueError(
            f"cannot load dataset '{source}' from the Hub: {str(err).splitlines()[0]}; check "
            "the name, or without the Hub give a file or a datasets.save_to_disk folder"
        ) from None
    return with_where(ds, f"'{source}'")


def _load_file(path: Path):
    import datasets

    if path.stat().st_size == 0:
        raise ValueError(f"dataset file '{path}' is empty")
    kind = _FILE_SUFFIXES[path.suffix]
    if kind in ("json", "csv"):
        rows = _read_json_rows(path) if kind == "json" else read_csv_rows(path)
        try:
            ds = datasets.Dataset.from_list(rows)
        except UnicodeEncodeError:  # json.loads keeps escapes like "\ud800"; Arrow cannot
            raise ValueError(f"dataset file '{path}' holds a string with a lone surrogate "
                             "escape (e.g. \\ud800), which is not text: fix the escape") from None
        except (ValueError, TypeError, OverflowError) as err:  # pyarrow: mixed types per field
            where = first_type_clash(rows) or f"dataset file '{path}' ({_first_line(err)})"
            raise ValueError(f"{where}: give each field one type in every record") from None
        if len(ds) == 0:  # also [{}]: Arrow makes a table of no rows and no columns
            raise ValueError(f"dataset file '{path}' holds no records")
        return ds
    try:
        ds = datasets.load_dataset("parquet", data_files=str(path), split="train")
    except Exception as err:
        raise ValueError(f"dataset file '{path}' cannot be read: {str(err).splitlines()[0]}") from None
    return with_where(ds, f"'{path}'", "row")


def _read_json_rows(path: Path) -> list[dict[str, Any]]:
    text = read_text(path)
    if path.suffix == ".json":
        data = _parse_json(text, f"dataset file '{path}'")
        if isinstance(data, dict):
            data = next((v for v in data.values() if isinstance(v, list)), None)
        if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
            raise ValueError(f"dataset file '{path}' must hold a list of objects")
        return [{**row, WHERE: f"'{path}' index {i}"} for i, row in enumerate(data)]
    rows = []
    # split on "\n" only: str.splitlines() also splits at U+2028 and other breaks that
    # JSON allows raw inside a string, and would cut such a record in two
    for lineno, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        row = _parse_json(line, f"dataset file '{path}' line {lineno}")
        if not isinstance(row, dict):
            raise ValueError(f"dataset file '{path}' line {lineno} is not a JSON object")
        rows.append({**row, WHERE: f"'{path}' line {lineno}"})
    return rows


def _parse_json(text: str, where: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"{where} is not JSON: {err.msg} (column {err.colno}); fix or delete it "
                         "(--on-bad-record skip leaves out bad records, not text that is not JSON)") from None
    except RecursionError:  # json's C decoder recurses per nesting level
        raise ValueError(f"{where} is nested too deeply to parse") from None


def _first_line(err: Exception) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


# --- formats -------------------------------------------------------------------------
def detect_format(columns: list[str], requested: str, source: str) -> str:
    columns = [c for c in columns if c != WHERE]
    if requested == "auto":
        if "messages" in columns:
            return "chat"
        if {"instruction", "output"} <= set(columns):
            return "instruction"
        raise ValueError(
            f"dataset '{source}' has columns {sorted(columns)}: expected 'instruction' "
            "+ 'output' (+ optional 'input') or 'messages'"
        )
    needed = {"chat": {"messages"}, "instruction": {"instruction", "output"}}[requested]
    if not needed <= set(columns):
        raise ValueError(
            f"dataset '{source}' lacks column(s) {sorted(needed - set(columns))} needed "
            f"by data-format '{requested}'"
        )
    return requested


def to_messages(record: Any, fmt: str) -> list[dict[str, str]]:
    """One record as chat messages. Every assistant message is a response to learn
    (one for an instruction record); the last message must be one.

    A record of the wrong shape raises one ValueError saying what is wrong and how to
    fix it: records come from users' files, so any JSON value may sit in any field.
    Blank (empty or whitespace-only) prompts and responses are refused in both formats.
    """
    if not isinstance(record, dict):
        raise ValueError(f"a record must be an object, got {type(record).__name__}")
    if fmt == "chat":
        return _chat_messages(record.get("messages"))
    prompt = _text(record.get("instruction"), "instruction").strip()
    extra = _text(record.get("input"), "input").strip()
    answer = _text(record.get("output"), "output").strip()
    if not prompt or not answer:
        raise ValueError("an instruction record needs non-empty 'instruction' and 'output'")
    if extra:
        prompt = f"{prompt}\n\n{extra}"
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]


def _chat_messages(messages: Any) -> list[dict[str, str]]:
    if not isinstance(messages, list) or len(messages) < 2:
        raise ValueError("a chat record needs 'messages': a list of at least a prompt and "
                         "an assistant message")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise ValueError(f"message {i} must be an object with a string 'role' and 'content'")
        content = _text(message.get("content"), f"message {i} content", scalar=False)
        if message["role"] in ("user", "assistant") and not content.strip():
            raise ValueError(f"message {i} ({message['role']}) is blank: give it text or "
                             "remove the record")
        # None: the key is absent (Arrow gives every message of a file the same keys)
        if message.get("train") is not None and not isinstance(message["train"], bool):
            raise ValueError(f"message {i} 'train' must be true or false")
        if message.get("weight") is not None and message["weight"] not in (0, 1):
            raise ValueError(f"message {i} 'weight' must be 0 or 1")
    if messages[-1]["role"] != "assistant":
        raise ValueError("a chat record must end with an assistant message")
    if not any(trains(m) for m in messages):
        raise ValueError("every assistant message of the record is opted out ('train': false "
                         "or 'weight': 0): nothing to learn")
    return messages  # as given: a template may use more keys than role and content


def _text(value: Any, name: str, *, scalar: bool = True) -> str:
    """A field as text: None is empty; numbers (as CSV loads them) are written out when
    ``scalar``; lists, objects and lone surrogates (tokenizers reject them) are errors."""
    if value is None and scalar:
        return ""
    if scalar and isinstance(value, (int, float)):
        return str(value)
    if not isinstance(value, str):
        raise ValueError(f"'{name}' must be text, got {type(value).__name__}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(f"'{name}' holds a lone surrogate (an escape like \\ud800), "
                         "which is not text") from None
    return value


def tokenize_example(messages: list[dict[str, str]], tokenizer, max_length: int, *,
                     truncation: str = "drop") -> dict | None:
    """Token ids with labels on every trained assistant turn (content and end-of-turn
    marker), -100 elsewhere; None when dropped (see :func:`common.chat.encode_chat`)."""
    return encode_chat(messages, tokenizer, max_length, truncation=truncation).example


# --- the data of one run ---------------------------------------------------------------
@dataclass(frozen=True)
class RunData:
    """Held-out split, validation split (early stopping only), and the partitioner over
    the rest (partitions built lazily)."""

    heldout: Any  # datasets.Dataset
    validation: Any  # empty unless early stopping needs it: never the held-out split
    train_pool: Any
    partitioner: Any
    fmt: str
    num_partitions: int
    skipped: tuple = ()  # bad records left out under on-bad-record 'skip': (where, reason)

    def partition(self, partition_id: int, max_examples: int = 0):
        if not 0 <= partition_id < self.num_partitions:
            raise ValueError(
                f"partition-id {partition_id} is outside 0..{self.num_partitions - 1}"
            )
        try:
            with warnings.catch_warnings():  # one per failed Dirichlet draw: the error says it
                warnings.filterwarnings("ignore", message=".*min_partition_size", category=UserWarning)
                part = self.partitioner.load_partition(partition_id)
        except (ValueError, IndexError) as err:  # Dirichlet: no draw met min_partition_size;
            # IID: more partitions than records
            raise ValueError(f"partition {partition_id} cannot be drawn ({_first_line(err)}): "
                             "raise --dirichlet-alpha, use fewer --num-clients, or "
                             "--partitioner iid") from None
        if max_examples and len(part) > max_examples:
            part = part.select(range(max_examples))
        if len(part) == 0:
            raise ValueError(f"partition {partition_id} is empty: use fewer --num-clients "
                             "(or a higher --dirichlet-alpha)")
        return part


def load_run_data(cfg: RunConfig, num_partitions: int) -> RunData:
    fmt = (cfg.data_format, cfg.text_column, cfg.label_column) if cfg.task == "classification" else cfg.data_format
    # With an eval-dataset nothing is held out of the training data.
    held_out = 0 if cfg.eval_dataset else cfg.eval_examples
    return _load_run_data(cfg.dataset, fmt, ",".join(cfg.category_list), cfg.partitioner,
                          cfg.partition_by, cfg.dirichlet_alpha, held_out,
                          cfg.validation_examples if cfg.uses_validation else 0,
                          cfg.seed, num_partitions, cfg.on_bad_record,
                          ",".join(cfg.meta_test_category_list))


@functools.lru_cache(maxsize=4)
def _load_run_data(dataset, data_format, categories, partitioner, partition_by,
                   dirichlet_alpha, eval_examples, validation_examples, seed,
                   num_partitions, on_bad_record="error", meta_test="") -> RunData:
    ds = load_dataset_any(dataset)
    if isinstance(data_format, tuple):  # classification: (format, text column, label column)
        fmt = classification_format(ds.column_names, data_format[1], data_format[2], dataset)
    else:
        fmt = detect_format(ds.column_names, data_format, dataset)
    ds, skipped = check_records(ds, fmt, on_bad_record, to_messages)  # in file order
    wanted = [c.strip() for c in categories.split(",") if c.strip()]
    unseen = [c.strip() for c in meta_test.split(",") if c.strip()]
    needs_column = partitioner in ("natural", "dirichlet") or wanted or unseen
    if needs_column and partition_by not in ds.column_names:
        filters = [k for k, v in (("categories", wanted), ("meta-test-categories", unseen)) if v]
        raise ValueError(missing_column_message(dataset, partition_by, partitioner, filters))
    if wanted or unseen:
        ds = _filter_categories(ds, partition_by, wanted, unseen)
    ds = ds.shuffle(seed=seed)
    held = eval_examples + validation_examples
    if len(ds) <= held:
        raise ValueError(
            f"dataset '{dataset}' has {len(ds)} records, not more than eval-examples + "
            f"validation-examples ({held}): lower them or add data"
        )
    heldout = ds.select(range(eval_examples))
    validation = ds.select(range(eval_examples, held))
    pool = ds.select(range(held, len(ds)))
    part = _make_partitioner(partitioner, partition_by, dirichlet_alpha, seed, num_partitions)
    part.dataset = pool
    if partitioner == "natural":
        n_values = len(pool.unique(partition_by))
        if n_values != num_partitions:
            raise ValueError(
                f"natural partitioning by '{partition_by}' gives {n_values} clients but "
                f"{num_partitions} were asked for: set --num-clients {n_values} or change "
                "--categories"
            )
    return RunData(heldout=heldout, validation=validation, train_pool=pool, partitioner=part, fmt=fmt,
                   num_partitions=num_partitions, skipped=skipped)


def _filter_categories(ds, column: str, wanted: list[str], unseen: list[str]):
    """Keep the ``wanted`` values of ``column`` (all when empty), minus the ``unseen``
    tasks ('meta-test-categories'), which no client, held-out or validation split sees."""
    present = set(ds.unique(column))
    values = sorted(map(str, present))
    shown = ", ".join(values[:8]) + (f", ... ({len(values)} values)" if len(values) > 8 else "")
    for key, names in (("categories", wanted), ("meta-test-categories", unseen)):
        unknown = [c for c in names if c not in present]
        if unknown:
            raise ValueError(f"{key} {unknown} are not values of column '{column}' ({shown}): "
                             f"fix --{key}" + (", or --categories '' to keep all"
                                               if key == "categories" else ""))
    both = sorted(set(wanted) & set(unseen))
    if both:
        raise ValueError(f"{both} are in both --categories (trained on; for the built-in data "
                         "its default 'auto' is the four demo categories) and "
                         "--meta-test-categories (held out as unseen tasks): remove them from "
                         "one, or set --categories to the ones to train on")
    keep, drop = set(wanted), set(unseen)
    return ds.filter(lambda r: (not keep or r[column] in keep) and r[column] not in drop)


def missing_column_message(dataset: str, partition_by: str, partitioner: str,
                           filters: list[str]) -> str:
    """Why the partition column is needed, and the fix for each setting that needs it:
    the natural and Dirichlet partitioners, and each category filter set (`filters`:
    the keys "categories" / "meta-test-categories" that are non-empty). A flag already
    given (e.g. --partitioner iid) or a filter not set is never suggested."""
    uses, fixes = [], []
    if partitioner in ("natural", "dirichlet"):
        uses.append(f"the {partitioner} partitioner")
        fixes.append("--partitioner iid")
    if filters:
        uses.append(f"the {' / '.join('--' + k for k in filters)} filter")
        fixes.append(" ".join(f"--{k} ''" for k in filters))
    return (f"dataset '{dataset}' has no column '{partition_by}' (partition-by), which "
            f"{' and '.join(uses)} need{'s' * (len(uses) == 1)}: set --partition-by to an "
            f"existing column, or {' '.join(fixes)}")


def _make_partitioner(kind, partition_by, alpha, seed, num_partitions):
    from flwr_datasets.partitioner import (
        DirichletPartitioner, IidPartitioner, NaturalIdPartitioner,
    )

    if kind == "natural":
        return NaturalIdPartitioner(partition_by=partition_by)
    if kind == "iid":
        return IidPartitioner(num_partitions=num_partitions)
    return DirichletPartitioner(
        num_partitions=num_partitions, partition_by=partition_by, alpha=alpha,
        min_partition_size=1, seed=seed,
    )


def classification_format(columns: list[str], text_column: str, label_column: str,
                          source: str) -> str:
    """'classification:<text column>:<label column>', after checking both exist."""
    columns = [c for c in columns if c != WHERE]
    if text_column == "auto":
        text_column = next((c for c in ("text", "output") if c in columns), "text")
    for kind, column in (("text-column", text_column), ("label-column", label_column)):
        if column not in columns:
            raise ValueError(
                f"dataset '{source}' has no column '{column}' ({kind}); it has "
                f"{sorted(columns)}: set --{kind}"
            )
    return f"classification:{text_column}:{label_column}"


def class_labels(cfg: RunConfig) -> list[str]:
    """The label set, from the training pool: sorted, so every process agrees on ids."""
    data = load_run_data(cfg, cfg.num_clients)
    label_column = data.fmt.split(":")[2]
    return sorted({str(v) for v in data.train_pool[label_column]})


def tokenize_classification(ds, fmt: str, labels: list[str], tokenizer,
                            max_length: int) -> list[dict]:
    _, text_column, label_column = fmt.split(":")
    ids = {label: i for i, label in enumerate(labels)}
    examples = []
    for index, record in enumerate(ds):
        text, label = record[text_column], str(record[label_column])
        where = f"dataset {record[WHERE]}" if WHERE in record else f"record {index}"
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"{where}: empty or missing '{text_column}'")
        if label not in ids:
            raise ValueError(
                f"{where}: label {label!r} is not among the {len(ids)} labels seen in "
                "training; every held-out label must also occur in the training data"
            )
        enc = tokenizer(text, truncation=True, max_length=max_length)
        examples.append({"input_ids": enc["input_ids"], "label": ids[label]})
    if not examples:
        raise ValueError("no usable records")
    return examples


def tokenize_dataset(ds, fmt: str, tokenizer, max_length: int, *,
                     truncation: str = "drop", on_bad_record: str = "error") -> list[dict]:
    """The trainable examples of ``ds`` (see :func:`tokenize_records`)."""
    return tokenize_records(ds, fmt, tokenizer, max_length, truncation=truncation,
                            on_bad_record=on_bad_record)[0]


def tokenize_records(ds, fmt: str, tokenizer, max_length: int, *, truncation: str = "drop",
                     on_bad_record: str = "error",
                     require: bool = True) -> tuple[list[dict], DataStats]:
    """Chat/instruction records as examples, and what became of each (``DataStats``).

    A record the template cannot render is an error naming its file and line, or under
    ``on_bad_record='skip'`` a skipped record. ``require``: raise when no example is
    left, with the counts and the fix.
    """
    if tokenizer.chat_template is None:
        raise ValueError(
            "the model's tokenizer has no chat template: fedtune renders records with it; "
            "use an instruct/chat model (or --task classification for an encoder)"
        )
    examples, stats = [], DataStats()
    for index, record in enumerate(ds):
        where = record.get(WHERE, f"record {index}") if isinstance(record, dict) else f"record {index}"
        try:
            encoded = encode_chat(to_messages(record, fmt), tokenizer, max_length,
                                  truncation=truncation)
        except (ValueError, TypeError, KeyError, AttributeError) as err:
            if on_bad_record != "skip":
                label = f"dataset {where}" if where.startswith("'") else where
                raise ValueError(f"{label}: {err}") from None
            log.info("skipped %s: %s", where, err)  # the run's run.log lists each
            stats.skipped.append((where, str(err)))
            continue
        stats.records += 1
        if encoded.example is None:
            stats.dropped += 1
            stats.dropped_reasons.append((where, encoded.reason))
            continue
        stats.kept += encoded.status == "kept"
        stats.truncated += encoded.status == "truncated"
        stats.lengths.append(len(encoded.example["input_ids"]))
        examples.append(encoded.example)
    if require and not examples:
        raise ValueError(
            f"no usable records ({stats.line()}): every example is longer than max-length "
            f"{max_length} or has no trained token within it; raise --max-length or use "
            "--truncation keep-start")
    return examples, stats


# --- batches -------------------------------------------------------------------------
def collate(examples: list[dict], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example; padding is masked and carries no label.

    Causal LM examples carry per-token ``labels``; classification examples one
    ``label``, which becomes ``labels`` of shape (batch,).
    """
    length = max(len(e["input_ids"]) for e in examples)
    ids = torch.full((len(examples), length), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(examples), length), dtype=torch.long)
    for row, e in enumerate(examples):
        n = len(e["input_ids"])
        ids[row, :n] = torch.tensor(e["input_ids"])
        mask[row, :n] = 1
    if "label" in examples[0]:
        labels = torch.tensor([e["label"] for e in examples], dtype=torch.long)
    else:
        labels = torch.full((len(examples), length), IGNORE_INDEX, dtype=torch.long)
        for row, e in enumerate(examples):
            labels[row, :len(e["labels"])] = torch.tensor(e["labels"])
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def batches_forever(examples: list[dict], batch_size: int, pad_token_id: int,
                    generator: torch.Generator, *,
                    group_by_length: bool = False) -> Iterator[dict[str, torch.Tensor]]:
    """Shuffled epochs without end: a round asks for steps, not epochs.

    ``group_by_length`` batches examples of similar length (see
    :func:`length_grouped_batches`) to cut padding; off, the order is exactly the
    plain shuffle, so runs and resumes without it stay bit-identical.
    """
    lengths = [len(e["input_ids"]) for e in examples] if group_by_length else None
    while True:
        order = torch.randperm(len(examples), generator=generator).tolist()
        if lengths is None:
            chunks = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
        else:
            chunks = length_grouped_batches(order, lengths, batch_size, generator)
        for chunk in chunks:
            yield collate([examples[i] for i in chunk], pad_token_id)


GROUP_MEGABATCH = 50  # batches per length-sorted group: Hugging Face's LengthGroupedSampler


def length_grouped_batches(order: list[int], lengths: list[int], batch_size: int,
                           generator: torch.Generator) -> list[list[int]]:
    """One epoch of batches of similar length, every index of ``order`` exactly once.

    As Hugging Face's ``group_by_length``: cut the shuffled order into mega-batches of
    ``GROUP_MEGABATCH`` batches, sort each by length, cut it into batches, then shuffle
    the batches (seeded) so a round does not see only the longest or the shortest.
    Packing would waste nothing, but needs per-sequence attention boundaries
    (position-id resets, flash-attn varlen) that the CPU attention paths lack.
    """
    mega = batch_size * GROUP_MEGABATCH
    batches = []
    for start in range(0, len(order), mega):
        group = sorted(order[start:start + mega], key=lambda i: lengths[i], reverse=True)
        batches += [group[i:i + batch_size] for i in range(0, len(group), batch_size)]
    shuffled = torch.randperm(len(batches), generator=generator).tolist()
    return [batches[i] for i in shuffled]


def padding_fraction(batches) -> float:
    """Share of the token slots in ``batches`` (collated) that are padding."""
    slots = real = 0
    for batch in batches:
        slots += batch["attention_mask"].numel()
        real += int(batch["attention_mask"].sum())
    return 1.0 - real / max(1, slots)


def batches_once(examples: list[dict], batch_size: int, pad_token_id: int):
    for start in range(0, len(examples), batch_size):
        yield collate(examples[start:start + batch_size], pad_token_id)


# --- cached, tokenized views used by the apps ------------------------------------------
@functools.lru_cache(maxsize=8)
def partition_examples(cfg: RunConfig, partition_id: int, num_partitions: int,
                       tokenizer) -> list[dict]:
    """One client's tokenized partition, built once per process (and read from the token
    cache when another process of the run, or an earlier run, built it)."""
    if cfg.task == "classification":
        data = load_run_data(cfg, num_partitions)
        return _tokenize(cfg, data, data.partition(partition_id, cfg.max_examples_per_client),
                         tokenizer)
    return partition_split(cfg, partition_id, num_partitions, tokenizer)[0]


def partition_split(cfg: RunConfig, partition_id: int, num_partitions: int,
                    tokenizer) -> tuple[list[dict], DataStats]:
    """A chat/instruction partition's examples and what became of its records."""
    def records():
        data = load_run_data(cfg, num_partitions)
        return data.partition(partition_id, cfg.max_examples_per_client), data.fmt

    return _cached(cfg, f"partition {partition_id} of {num_partitions}", tokenizer, records)


def heldout_split(cfg: RunConfig, num_partitions: int, tokenizer) -> tuple[list[dict], DataStats]:
    """The server's chat/instruction evaluation split ('eval-dataset' or held out)."""
    def records():
        data = load_run_data(cfg, num_partitions)  # the training data's checks, always
        return eval_split(cfg) if cfg.eval_dataset else (data.heldout, data.fmt)

    name = "eval-dataset" if cfg.eval_dataset else f"held-out of {num_partitions}"
    return _cached(cfg, name, tokenizer, records)


def validation_split(cfg: RunConfig, tokenizer) -> tuple[list[dict], DataStats]:
    """The validation split (early stopping, lr-plateau): examples and their stats."""
    def records():
        data = load_run_data(cfg, cfg.num_clients)
        return data.validation, data.fmt

    return _cached(cfg, "validation", tokenizer, records)


def load_skipped(cfg: RunConfig, tokenizer) -> tuple:
    """The records left out at load under on-bad-record 'skip', as (where, reason)."""
    def build():
        return [], DataStats(skipped=list(load_run_data(cfg, cfg.num_clients).skipped))

    return tuple(cached_split(cfg, "load", tokenizer, build)[1].skipped)


def _cached(cfg: RunConfig, name: str, tokenizer, records) -> tuple[list[dict], DataStats]:
    def build():
        ds, fmt = records()
        return tokenize_records(ds, fmt, tokenizer, cfg.max_length, truncation=cfg.truncation,
                                on_bad_record=cfg.on_bad_record)

    return cached_split(cfg, name, tokenizer, build)


@functools.lru_cache(maxsize=4)
def heldout_examples(cfg: RunConfig, num_partitions: int, tokenizer) -> list[dict]:
    """The server's evaluation examples, tokenized: the 'eval-dataset' records when one
    is given, else the split held out of 'dataset'; none when evaluation is off."""
    if cfg.task != "classification" and (cfg.eval_dataset or cfg.evaluates):
        return heldout_split(cfg, num_partitions, tokenizer)[0]
    if cfg.eval_dataset:
        load_run_data(cfg, num_partitions)  # the training data's checks, as without one
        ds, fmt = eval_split(cfg)  # label ids as in training: the training pool's
        return tokenize_classification(ds, fmt, class_labels(cfg), tokenizer, cfg.max_length)
    data = load_run_data(cfg, num_partitions)
    if not cfg.evaluates:
        return []
    return _tokenize(cfg, data, data.heldout, tokenizer)


def eval_split(cfg: RunConfig):
    """(records, format) of 'eval-dataset': shuffled with the run's seed, the first
    'eval-examples' of them (all when it has fewer). Taken as given: no category filter,
    and none of it is training data. Same sources, formats and checks as 'dataset'."""
    return _eval_split(cfg.eval_dataset, _format_key(cfg), cfg.eval_examples, cfg.seed)


def _format_key(cfg: RunConfig):
    if cfg.task == "classification":
        return (cfg.data_format, cfg.text_column, cfg.label_column)
    return cfg.data_format


@functools.lru_cache(maxsize=2)
def _eval_split(source: str, data_format, eval_examples: int, seed: int):
    ds = load_dataset_any(source)
    if isinstance(data_format, tuple):
        fmt = classification_format(ds.column_names, data_format[1], data_format[2], source)
    else:
        fmt = detect_format(ds.column_names, data_format, source)
    ds = ds.shuffle(seed=seed)
    return ds.select(range(min(eval_examples, len(ds)))), fmt


def validation_examples(cfg: RunConfig, tokenizer) -> list[dict]:
    if cfg.task != "classification":
        return validation_split(cfg, tokenizer)[0]
    data = load_run_data(cfg, cfg.num_clients)
    return _tokenize(cfg, data, data.validation, tokenizer)


def _tokenize(cfg: RunConfig, data: RunData, ds, tokenizer, *, fmt: str | None = None) -> list[dict]:
    fmt = fmt or data.fmt
    if cfg.task == "classification":
        return tokenize_classification(ds, fmt, class_labels(cfg), tokenizer, cfg.max_length)
    return tokenize_dataset(ds, fmt, tokenizer, cfg.max_length, truncation=cfg.truncation,
                            on_bad_record=cfg.on_bad_record)


def leading_examples(cfg: RunConfig, tokenizer, *, labels: list[str] | None = None) -> list[dict]:
    """The first ``eval-examples`` records of ``cfg.dataset`` in file order, tokenized:
    what ``fedtune evaluate`` scores when no run's held-out split applies.
    Classification needs the run's ``labels``, so that ids mean what they meant in training."""
    ds = load_dataset_any(cfg.dataset)
    ds = ds.select(range(min(cfg.eval_examples, len(ds))))
    if cfg.task == "classification":
        fmt = classification_format(ds.column_names, cfg.text_column, cfg.label_column, cfg.dataset)
        return tokenize_classification(ds, fmt, labels, tokenizer, cfg.max_length)
    fmt = detect_format(ds.column_names, cfg.data_format, cfg.dataset)
    return tokenize_dataset(ds, fmt, tokenizer, cfg.max_length, truncation=cfg.truncation,
                            on_bad_record=cfg.on_bad_record)
