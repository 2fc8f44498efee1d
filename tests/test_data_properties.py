"""Property tests of the data parsers: whatever a file or record holds, records come
out or one line names the file or the record; never another exception type."""

import json
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from common.data import load_dataset_any, to_messages, tokenize_dataset
from common.records import WHERE

PARSER_SETTINGS = settings(max_examples=60, deadline=None,
                           suppress_health_check=[HealthCheck.too_slow,
                                                  HealthCheck.data_too_large])

# JSON values as they occur in records: scalars, text with any code point (lone
# surrogates, U+2028 and other line breaks included), nested lists and objects.
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=8,
)
FIELDS = ["instruction", "input", "output", "messages", "category", ""]
records = st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=6), json_values, max_size=5)
good_records = st.fixed_dictionaries({
    "instruction": st.text(min_size=1, max_size=30), "output": st.text(min_size=1, max_size=30),
    "input": st.text(max_size=10)})
chat_records = st.fixed_dictionaries({"messages": st.lists(st.fixed_dictionaries({
    "role": st.sampled_from(["system", "user", "assistant", "tool", ""]) | st.text(max_size=5),
    "content": st.text(max_size=30) | json_values}), max_size=4)})
lines = st.one_of(
    good_records.map(json.dumps), records.map(json.dumps), chat_records.map(json.dumps),
    good_records.map(lambda r: json.dumps(r, ensure_ascii=False)),  # raw U+2028 inside strings
    st.just(""), st.just("   "), st.text(max_size=30),                # blank lines, garbage
    st.integers(1, 200_000).map(lambda n: json.dumps({"instruction": "x" * n, "output": "y"})),
    json_values.map(json.dumps),                                      # valid JSON, not an object
)
clean_text = st.text(st.characters(exclude_categories=("Cs",)), min_size=1, max_size=40).filter(str.strip)


def _encoded(parts: list) -> bytes:
    return b"\n".join(p if isinstance(p, bytes) else p.encode("utf-8", "surrogatepass")
                      for p in parts)


file_bytes = st.one_of(
    st.lists(lines | st.binary(max_size=20), max_size=6).map(_encoded),  # incl. non-UTF-8
    st.lists(lines, min_size=1, max_size=6).map(lambda ls: "\r\n".join(ls).encode("utf-8", "surrogatepass")),
    st.lists(records, max_size=4).map(lambda rs: json.dumps(rs).encode()),  # a .json list
    st.binary(max_size=64),
)


def _one_line(err: Exception) -> str:
    message = str(err)
    assert message and "\n" not in message, repr(message)
    return message


@PARSER_SETTINGS
@given(content=file_bytes, suffix=st.sampled_from([".jsonl", ".json"]))
@example(content=b'{"instruction": "a", "output": "b\xe2\x80\xa8c"}\n', suffix=".jsonl")
@example(content=b'\xef\xbb\xbf{"instruction": "a", "output": "b"}\n', suffix=".jsonl")
@example(content=b'{"instruction": "a\xff", "output": "b"}\n', suffix=".jsonl")
@example(content=b'{"a": 1}\n{"a": "x"}\n', suffix=".jsonl")
@example(content=b"[" * 100_000, suffix=".json")
def test_json_files_give_records_or_one_line_naming_the_file(content, suffix):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"data{suffix}"
        path.write_bytes(content)
        try:
            ds = load_dataset_any(str(path))
        except (ValueError, FileNotFoundError) as err:
            assert str(path) in _one_line(err)
        else:
            assert len(ds) >= 1


@PARSER_SETTINGS
@given(rows=st.lists(st.fixed_dictionaries({"instruction": clean_text, "output": clean_text}),
                     min_size=1, max_size=5), bom=st.booleans(), crlf=st.booleans())
def test_valid_jsonl_always_loads_all_its_records(rows, bom, crlf):
    """Raw U+2028 or U+0085 inside strings, a byte order mark, CRLF line ends: all valid."""
    text = ("\r\n" if crlf else "\n").join(json.dumps(r, ensure_ascii=False) for r in rows)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "data.jsonl"
        path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + text.encode("utf-8"))
        assert load_dataset_any(str(path)).remove_columns(WHERE).to_list() == rows


@PARSER_SETTINGS
@given(record=records | good_records | chat_records, fmt=st.sampled_from(["instruction", "chat"]),
       max_length=st.integers(1, 64))
def test_records_tokenize_or_one_line_naming_the_record(tokenizer, record, fmt, max_length):
    try:
        messages = to_messages(record, fmt)
    except ValueError as err:
        _one_line(err)
    else:
        assert messages[-1]["role"] == "assistant"
        assert all(isinstance(m["content"], str) for m in messages)
    try:
        examples = tokenize_dataset([record], fmt, tokenizer, max_length)
    except ValueError as err:
        assert _one_line(err).startswith(("record 0: ", "no usable records"))
    else:
        assert all(len(e["input_ids"]) == len(e["labels"]) <= max_length for e in examples)


@PARSER_SETTINGS
@given(instruction=clean_text, output=clean_text, extra=st.text(max_size=10))
def test_well_formed_instruction_records_always_parse(tokenizer, instruction, output, extra):
    record = {"instruction": instruction, "input": extra, "output": output}
    assert [m["role"] for m in to_messages(record, "instruction")] == ["user", "assistant"]
    assert tokenize_dataset([record], "instruction", tokenizer, 512)
