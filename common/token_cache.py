"""Tokenized splits on disk, shared by every process of a run and by later runs.

A `fedtune simulate` tokenizes the same data in several processes: the preflight checks
every partition, each Ray actor tokenizes each partition it serves, the server its
held-out split. On the demo that is ~14 s of chat-template rendering and tokenizing in
the preflight, plus ~6 s of loading and filtering WordNet in every process (measured:
docs/benchmarks.md). The first process to tokenize a split writes it here; the others
read it in a tenth of a second and never load the raw dataset.

The key is what the tokens are a function of, as ``datasets``' fingerprints are: every
data source's content (a local file or folder: each file's path, size and SHA-256; the
built-in data: its WordNet files), the run's whole config (only ``run-dir`` and
``resume-from`` left out), the split's name, the tokenizer's full serialisation, chat
template and special tokens, the versions of the libraries that render, tokenize, shuffle
and partition (transformers, tokenizers, jinja2, datasets, flwr-datasets), and the source
of fedtune's data code. A dataset from the Hub, a classification task, a tokenizer without
a serialisable fast backend, or ``FEDTUNE_TOKEN_CACHE=0`` (or off/false/no) turns the
cache off (``FEDTUNE_TOKEN_CACHE=/some/folder`` moves it). An entry that cannot be read or
does not hold together is tokenized again and rewritten. Entries are plain numpy ``.npz`` files
(no pickle), written atomically; the least recently used go past
``FEDTUNE_TOKEN_CACHE_MB`` (default 1024 MB).

Why by hand: ``datasets.map`` caches only datasets backed by files (the built-in data
and our file readers build in-memory tables), and its cache would still need the raw
dataset loaded to find the entry.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
from pathlib import Path
from typing import Callable

import numpy as np

from common.config import BUILTIN_DATASET, RunConfig
from common.records import DataStats

log = logging.getLogger(__name__)
_VERSION = 1
_IGNORED_KEYS = ("run-dir", "resume-from")  # where a run writes, not what it reads
_CODE = ("chat.py", "data.py", "records.py", "config.py", "wordnet.py", "token_cache.py")
_TOKENIZER_IDS: dict[int, str | None] = {}
_FILE_IDS: dict[tuple, str] = {}


_OFF = ("0", "off", "false", "no")


def enabled() -> bool:
    return os.environ.get("FEDTUNE_TOKEN_CACHE", "").strip().lower() not in _OFF


def _limit_bytes() -> float:
    raw = os.environ.get("FEDTUNE_TOKEN_CACHE_MB", "1024")
    try:
        return float(raw) * 1e6
    except ValueError:
        raise ValueError(f"FEDTUNE_TOKEN_CACHE_MB='{raw}' is not a number of megabytes: set "
                         "it like FEDTUNE_TOKEN_CACHE_MB=1024, or unset it") from None


def cache_folder() -> Path:
    """FEDTUNE_TOKEN_CACHE when it names a folder, else ``tokens`` in fedtune's cache."""
    from common.model import cache_dir

    return Path(os.environ.get("FEDTUNE_TOKEN_CACHE") or cache_dir() / "tokens")


def cached_split(cfg: RunConfig, split: str, tokenizer,
                 build: Callable[[], tuple[list[dict], DataStats]]) -> tuple[list[dict], DataStats]:
    """``build()`` (the split's examples and their ``DataStats``), or what an earlier call
    with the same key stored. ``split`` names the split within the run, e.g.
    ``'partition 2 of 4'``. Errors raised by ``build`` propagate and nothing is stored."""
    key = split_key(cfg, split, tokenizer)
    if key:
        _limit_bytes()  # a bad setting fails before any work, not after it
    path = cache_folder() / f"{key}.npz" if key else None
    if path is not None and path.exists():
        loaded = _read(path)
        if loaded is not None:
            for where, reason in loaded[1].skipped:  # as tokenize_records logs them
                log.info("skipped %s: %s", where, reason)
            return loaded
    examples, stats = build()
    if path is not None:
        _write(path, examples, stats)
    return examples, stats


def split_key(cfg: RunConfig, split: str, tokenizer) -> str | None:
    """The cache key of one split (hex), or None where nothing may be cached."""
    if not enabled():
        return None
    sources = [_source_identity(cfg.dataset)]
    if cfg.eval_dataset:
        sources.append(_source_identity(cfg.eval_dataset))
    tokenizer_id = _tokenizer_identity(tokenizer)
    if tokenizer_id is None or any(s is None for s in sources):
        return None
    config = {k: v for k, v in cfg.to_mapping().items() if k not in _IGNORED_KEYS}
    here = Path(__file__).parent
    code = hashlib.sha256(b"".join((here / name).read_bytes() for name in _CODE)).hexdigest()
    blob = json.dumps([_VERSION, split, sources, tokenizer_id, config, code],
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def _source_identity(source: str) -> list | None:
    """What a source's content is known by without reading it; None for the Hub."""
    if source == BUILTIN_DATASET:
        from common.wordnet import WORDNET_DIR

        return [source, _files_identity(WORDNET_DIR)]
    path = Path(source).expanduser()
    if not path.exists():
        return None  # a Hub name: its own cache and revision decide, not ours
    return [str(path.resolve()), _files_identity(path)]


def _files_identity(path: Path) -> list:
    files = sorted(p for p in path.rglob("*") if p.is_file() and not _derived(p)) \
        if path.is_dir() else [path]
    return [_file_identity(p) for p in files]


def _derived(path: Path) -> bool:
    """Files ``datasets`` writes next to a save_to_disk folder's data when it filters or
    maps it (cache-<fingerprint>.arrow) and lock files: not the data itself."""
    return (path.name.startswith("cache-") and path.suffix == ".arrow") or path.suffix == ".lock"


def _file_identity(path: Path) -> tuple:
    """(path, size, SHA-256). Hashed once per process and version of the file: the memo
    key holds the change time, which every write moves and ``touch`` cannot set back."""
    stat = path.stat()
    memo = (str(path), stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns)
    if memo not in _FILE_IDS:
        digest = hashlib.sha256()
        with path.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        _FILE_IDS[memo] = digest.hexdigest()
    return str(path), stat.st_size, _FILE_IDS[memo]


def _tokenizer_identity(tokenizer) -> str | None:
    if id(tokenizer) not in _TOKENIZER_IDS:
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is None:
            _TOKENIZER_IDS[id(tokenizer)] = None
        else:
            digest = hashlib.sha256(backend.to_str().encode())
            # the template also reads bos/eos and the special tokens from the config
            added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
            digest.update(json.dumps([
                str(getattr(tokenizer, "chat_template", "")), tokenizer.pad_token_id,
                getattr(tokenizer, "special_tokens_map", {}),
                sorted(map(str, tokenizer.all_special_tokens)),
                sorted((int(i), str(t)) for i, t in added.items()), _versions(),
            ], sort_keys=True, default=str).encode())
            _TOKENIZER_IDS[id(tokenizer)] = digest.hexdigest()
    return _TOKENIZER_IDS[id(tokenizer)]


def _versions() -> dict:
    """The libraries that render, tokenize, shuffle and partition the data."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("transformers", "tokenizers", "jinja2", "datasets", "flwr-datasets"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def _write(path: Path, examples: list[dict], stats: DataStats) -> None:
    lengths = np.array([len(e["input_ids"]) for e in examples], dtype=np.int64)
    flat = [t for e in examples for t in e["input_ids"]]
    labels = [t for e in examples for t in e["labels"]]
    meta = {"records": stats.records, "kept": stats.kept, "truncated": stats.truncated,
            "dropped": stats.dropped, "skipped": stats.skipped,
            "dropped-reasons": stats.dropped_reasons, "lengths": stats.lengths}
    buffer = io.BytesIO()
    np.savez(buffer, input_ids=np.array(flat, dtype=np.int32), labels=np.array(labels, dtype=np.int32),
             lengths=lengths, meta=np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8))
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tmp.open("wb") as f:
            f.write(buffer.getvalue())
            f.flush()
            os.fsync(f.fileno())  # a crash leaves the old entry or the whole new one
        os.replace(tmp, path)  # atomic: a reader sees the old file, the new one, or none
        _prune(path.parent)
    except OSError as err:  # a read-only or full disk costs time, not the run
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
        log.warning("token cache not written (%s): %s", path, err)


def _read(path: Path) -> tuple[list[dict], DataStats] | None:
    """The entry at ``path``, or None (and a warning) when it cannot be read or does not
    hold together: the caller tokenizes again and rewrites it."""
    try:
        with np.load(path, allow_pickle=False) as z:
            ids, labels, lengths = z["input_ids"], z["labels"], z["lengths"]
            meta = json.loads(z["meta"].tobytes())
        examples, stats = _unpack(ids, labels, lengths, meta)
    except Exception as err:  # noqa: BLE001 - any damage (zip, json, shapes) means rebuild
        log.warning("token cache entry %s unreadable (%s): tokenizing again", path, err)
        return None
    try:
        os.utime(path)  # recently used: pruned last
    except OSError:
        pass  # a read-only cache is still read
    return examples, stats


def _unpack(ids, labels, lengths, meta) -> tuple[list[dict], DataStats]:
    if not (ids.ndim == labels.ndim == lengths.ndim == 1 and len(ids) == len(labels)
            and int(lengths.sum()) == len(ids) and (lengths > 0).all()
            and len(lengths) == len(meta["lengths"]) == meta["kept"] + meta["truncated"]):
        raise ValueError("arrays and counts disagree")
    ends = np.cumsum(lengths)
    starts = ends - lengths
    id_list, label_list = ids.tolist(), labels.tolist()
    examples = [{"input_ids": id_list[a:b], "labels": label_list[a:b]}
                for a, b in zip(starts.tolist(), ends.tolist())]
    stats = DataStats(records=int(meta["records"]), kept=int(meta["kept"]),
                      truncated=int(meta["truncated"]), dropped=int(meta["dropped"]),
                      skipped=[tuple(s) for s in meta["skipped"]],
                      dropped_reasons=[tuple(d) for d in meta["dropped-reasons"]],
                      lengths=[int(n) for n in meta["lengths"]])
    return examples, stats


def _prune(folder: Path) -> None:
    limit = _limit_bytes()
    entries = sorted(folder.glob("*.npz"), key=lambda p: p.stat().st_mtime)
    total = sum(p.stat().st_size for p in entries)
    for old in entries[:-1]:  # never the entry just written
        if total <= limit:
            break
        total -= old.stat().st_size
        old.unlink(missing_ok=True)
