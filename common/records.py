"""Users' records: read with where each came from, checked in file order, and counted.

Every record carries its original position in the column ``WHERE`` (e.g.
``'data.jsonl' line 5``): JSONL and CSV by line (1-based, as an editor shows it), JSON
arrays, ``save_to_disk`` folders and Hub datasets by index, Parquet by row (both
0-based, as ``ds[i]`` and ``df.iloc[i]``). Errors name it, so a message points at the
line to fix even after the records are split and shuffled.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

WHERE = "_fedtune_where"
ON_BAD_RECORD = ("error", "skip")


def with_where(ds, label: str, unit: str = "index"):
    """``ds`` plus the ``WHERE`` column: ``{label} {unit} {i}`` for record i (0-based)."""
    if WHERE in ds.column_names:
        return ds
    return ds.add_column(WHERE, [f"{label} {unit} {i}" for i in range(len(ds))])


def read_text(path: Path) -> str:
    """The file as text; raises ValueError naming the first byte that is not UTF-8."""
    try:  # utf-8-sig: editors on Windows write a byte order mark
        return path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise ValueError(f"dataset file '{path}' is not UTF-8 (byte {err.start}: {err.reason}): "
                         "save it as UTF-8 (e.g. `iconv -f latin1 -t utf-8`)") from None


def read_csv_rows(path: Path) -> list[dict[str, str]]:
    """CSV rows as dicts of text, exactly as in the cells: no type guessing and no NA
    conversion (pandas and ``datasets`` turn ``NA``/``null``/``None`` into missing
    values and ``007`` into ``7.0``), with ``WHERE`` set to the row's first line.
    Python's csv module, not pandas: it keeps text as text and counts lines."""
    reader = csv.reader(io.StringIO(read_text(path), newline=""))
    try:
        header = next(reader)
    except StopIteration:
        raise ValueError(f"dataset file '{path}' is empty") from None
    except csv.Error as err:
        raise ValueError(f"dataset file '{path}' line 1 is not CSV: {err}") from None
    if len(set(header)) != len(header) or not all(h.strip() for h in header):
        raise ValueError(f"dataset file '{path}' line 1: the header needs distinct, non-empty "
                         f"column names, got {header}")
    rows, line = [], reader.line_num
    while True:
        first = line + 1
        try:
            cells = next(reader)
        except StopIteration:
            break
        except csv.Error as err:
            raise ValueError(f"dataset file '{path}' line {first} is not CSV: {err}") from None
        line = reader.line_num
        if not cells:
            continue  # a blank line
        if len(cells) != len(header):
            raise ValueError(f"dataset file '{path}' line {first} has {len(cells)} cells, the "
                             f"header {len(header)}: quote cells that hold commas")
        rows.append({**dict(zip(header, cells)), WHERE: f"'{path}' line {first}"})
    return rows


def first_type_clash(rows: list[dict[str, Any]]) -> str:
    """Where a field first holds another JSON type than in the first record that has it
    (what Arrow refuses as 'does not fit one table'), as 'WHERE: field ...'."""
    kinds: dict[str, tuple[str, str]] = {}
    for row in rows:
        for key, value in row.items():
            if key == WHERE or value is None:
                continue
            kind = {bool: "boolean", int: "number", float: "number", str: "text",
                    list: "list", dict: "object"}.get(type(value), type(value).__name__)
            seen = kinds.setdefault(key, (kind, row.get(WHERE, "")))
            if seen[0] != kind:
                return (f"{row.get(WHERE, '')}: field '{key}' is {kind} but {seen[0]} at "
                        f"{seen[1]}")
    return ""


def check_records(ds, fmt: str, on_bad_record: str, to_messages) -> tuple[Any, tuple]:
    """``ds`` without its bad records, checked in file order, and the skipped ones as
    ``(where, reason)`` pairs. ``on_bad_record`` 'error' raises at the first bad record,
    naming its file and line; 'skip' logs and drops each. ``to_messages(record, fmt)``
    raises ValueError for a bad record."""
    if on_bad_record not in ON_BAD_RECORD:
        raise ValueError(f"on-bad-record '{on_bad_record}' is not one of {ON_BAD_RECORD}")
    if fmt not in ("chat", "instruction"):
        return ds, ()
    bad, skipped = [], []
    columns = ds.column_names
    index = 0
    for batch in ds.iter(batch_size=4096):  # columns in bulk: far faster than ds[i] rows
        for values in zip(*(batch[c] for c in columns)):
            record = dict(zip(columns, values))
            try:
                to_messages(record, fmt)
            except (ValueError, TypeError) as err:
                where = record.get(WHERE, f"record {index}")
                if on_bad_record == "error":
                    raise ValueError(f"dataset {where}: {err} (or --on-bad-record skip)") from None
                log.info("skipped %s: %s", where, err)  # the run's run.log lists each
                bad.append(index)
                skipped.append((where, str(err)))
            index += 1
    if bad:
        drop = set(bad)
        ds = ds.select([i for i in range(len(ds)) if i not in drop])
    return ds, tuple(skipped)


@dataclass
class DataStats:
    """What became of the records of one split or client: ``kept`` trained as written,
    ``truncated`` cut to max-length (policy keep-start), ``dropped`` left out (too long
    under policy drop, or no trained token within max-length), ``skipped`` bad records
    as (where, reason). ``lengths`` are token counts of the examples trained."""

    records: int = 0
    kept: int = 0
    truncated: int = 0
    dropped: int = 0
    skipped: list = field(default_factory=list)
    dropped_reasons: list = field(default_factory=list)
    lengths: list = field(default_factory=list)

    def add(self, other: "DataStats") -> "DataStats":
        return DataStats(self.records + other.records, self.kept + other.kept,
                         self.truncated + other.truncated, self.dropped + other.dropped,
                         self.skipped + other.skipped,
                         self.dropped_reasons + other.dropped_reasons,
                         self.lengths + other.lengths)

    def summary(self) -> dict:
        """JSON-ready counts; tokens per trained example as min/median/max."""
        lengths = self.lengths or [0]
        return {"records": self.records, "kept": self.kept, "truncated": self.truncated,
                "dropped": self.dropped, "skipped": len(self.skipped),
                "tokens-min": min(lengths), "tokens-median": statistics.median(lengths),
                "tokens-max": max(lengths)}

    def line(self) -> str:
        s = self.summary()
        return (f"{s['records']} records: {s['kept']} kept, {s['truncated']} truncated, "
                f"{s['dropped']} dropped, {s['skipped']} skipped; tokens per example "
                f"min {s['tokens-min']} median {s['tokens-median']:g} max {s['tokens-max']}")


def dumps_stats(splits: dict[str, DataStats]) -> str:
    return json.dumps({name: stats.summary() for name, stats in splits.items()}, indent=2)
