"""Records from users' files: errors name the line, bad records skip, CSV cells stay
text, truncation is counted."""

import json

import pytest

from common.config import RunConfig
from common.data import load_dataset_any, load_run_data, tokenize_records
from common.records import WHERE


def _cfg(path, **kw) -> RunConfig:
    base = dict(dataset=str(path), categories="", partitioner="iid", num_clients=2,
                eval_examples=2)
    return RunConfig(**{**base, **kw})


def _instruction(i: int) -> dict:
    return {"instruction": f"What is {i} plus 1?", "input": "", "output": f"{i + 1}."}


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def faulty_rows() -> list:
    """12 records with faults on lines 5, 8, 9 and 10 (1-based)."""
    rows = [_instruction(i) for i in range(12)]
    rows[4] = {"instruction": "What is 4 plus 1?", "input": ""}           # no output
    rows[7] = {**_instruction(7), "output": "   "}                        # blank output
    rows[8] = {**_instruction(8), "instruction": ""}                      # empty prompt
    rows[9] = {**_instruction(9), "output": ["a", "list"]}                # wrong type
    return rows


def test_error_mode_names_the_first_bad_line_in_file_order(tmp_path):
    path = write_jsonl(tmp_path / "faults.jsonl", faulty_rows())
    # a list in 'output' on line 10 does not fit the table: that is found at load
    with pytest.raises(ValueError, match=r"faults.jsonl' line 10: field 'output' is list"):
        load_run_data(_cfg(path), 2)
    rows = faulty_rows()
    rows[9] = {**_instruction(9), "output": ""}
    write_jsonl(path, rows)
    with pytest.raises(ValueError, match=r"dataset '.*faults.jsonl' line 5: an instruction "
                                         r"record needs non-empty 'instruction' and 'output'"):
        load_run_data(_cfg(path), 2)


def test_skip_mode_skips_exactly_the_bad_lines_and_keeps_the_rest(tmp_path, tokenizer):
    rows = faulty_rows()
    rows[9] = {**_instruction(9), "output": ""}
    path = write_jsonl(tmp_path / "faults.jsonl", rows)
    data = load_run_data(_cfg(path, on_bad_record="skip"), 2)
    assert [where.split("' ")[1] for where, _ in data.skipped] == [
        "line 5", "line 8", "line 9", "line 10"]
    kept = sorted(list(data.heldout[WHERE]) + list(data.train_pool[WHERE]),
                  key=lambda w: int(w.split()[-1]))
    assert [int(w.split()[-1]) for w in kept] == [1, 2, 3, 4, 6, 7, 11, 12]
    from common.datacheck import data_report

    report = data_report(_cfg(path, on_bad_record="skip"), tokenizer)
    assert len(report.skipped) == 4
    assert sum(report.splits[f"client {i}"].kept for i in (0, 1)) == 6  # 8 good - 2 held out
    assert report.lines()[-1] == "4 records skipped (see run.log)"


def test_blank_answers_are_refused_in_both_formats_with_file_and_line(tmp_path):
    chat = [{"messages": [{"role": "user", "content": f"q{i}"},
                          {"role": "assistant", "content": "   " if i == 2 else f"a{i}"}]}
            for i in range(6)]
    path = write_jsonl(tmp_path / "chat.jsonl", chat)
    with pytest.raises(ValueError, match=r"chat.jsonl' line 3: message 1 \(assistant\) is blank"):
        load_run_data(_cfg(path), 2)
    rows = [_instruction(i) for i in range(6)]
    rows[3]["output"] = " \t "
    path = write_jsonl(tmp_path / "inst.jsonl", rows)
    with pytest.raises(ValueError, match=r"inst.jsonl' line 4: an instruction record needs"):
        load_run_data(_cfg(path), 2)
    chat[2]["messages"][1]["content"] = "fine"
    chat[4]["messages"][0]["content"] = ""
    path = write_jsonl(tmp_path / "chat.jsonl", chat)
    with pytest.raises(ValueError, match=r"chat.jsonl' line 5: message 0 \(user\) is blank"):
        load_run_data(_cfg(path), 2)


def test_a_json_array_names_the_index(tmp_path):
    rows = [_instruction(i) for i in range(5)]
    rows[3]["output"] = ""
    path = tmp_path / "array.json"
    path.write_text(json.dumps(rows))
    with pytest.raises(ValueError, match=r"array.json' index 3: an instruction record"):
        load_run_data(_cfg(path), 2)


def test_latin1_csv_names_the_file_and_the_byte(tmp_path):
    path = tmp_path / "latin1.csv"
    path.write_bytes("instruction,output\nWhat is caf\xe9?,A drink.\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin1.csv' is not UTF-8 \(byte 30: "):
        load_dataset_any(str(path))


def test_csv_cells_arrive_as_written(tmp_path):
    path = tmp_path / "cells.csv"
    path.write_text("instruction,input,output\nq1,NA,null\nq2,,None\nq3,007,5\nq4,,NaN\n")
    rows = load_dataset_any(str(path)).to_list()
    assert [(r["input"], r["output"]) for r in rows] == [
        ("NA", "null"), ("", "None"), ("007", "5"), ("", "NaN")]
    assert [r[WHERE] for r in rows] == [f"'{path}' line {n}" for n in (2, 3, 4, 5)]


def test_csv_errors_name_the_line(tmp_path):
    path = tmp_path / "ragged.csv"
    path.write_text('instruction,output\nq1,a1\n"q2\nsecond line",a2\nq3,a3,extra\n')
    with pytest.raises(ValueError, match=r"ragged.csv' line 5 has 3 cells, the header 2"):
        load_dataset_any(str(path))


def test_truncation_counts_are_exact(tmp_path, tokenizer):
    # answers of known, growing length: the same prompt, 1..10 repeats of " x y"
    rows = [{"instruction": "Repeat.", "input": "", "output": "ok" + " x y" * n}
            for n in range(1, 11)]
    path = write_jsonl(tmp_path / "lengths.jsonl", rows)
    ds = load_dataset_any(str(path))
    _, full = tokenize_records(ds, "instruction", tokenizer, 10_000)
    lengths = sorted(full.lengths)
    assert len(set(lengths)) == 10 and full.kept == 10
    limit = lengths[6]  # 7 examples fit, 3 are longer
    examples, stats = tokenize_records(ds, "instruction", tokenizer, limit)
    assert (len(examples), stats.kept, stats.truncated, stats.dropped) == (7, 7, 0, 3)
    assert stats.dropped_reasons[0][0] == f"'{path}' line 8"
    examples, stats = tokenize_records(ds, "instruction", tokenizer, limit,
                                       truncation="keep-start")
    assert (len(examples), stats.kept, stats.truncated, stats.dropped) == (10, 7, 3, 0)
    assert max(len(e["input_ids"]) for e in examples) == limit
    # a limit inside the (shared) prompt leaves no trained token: dropped under both
    prompt_len = next(i for i, t in enumerate(examples[0]["labels"]) if t != -100)
    for policy in ("drop", "keep-start"):
        examples, stats = tokenize_records(ds, "instruction", tokenizer, prompt_len,
                                           truncation=policy, require=False)
        assert (examples, stats.dropped) == ([], 10)
