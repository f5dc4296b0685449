"""Hostile rows, parsed without Ray: deep nesting, rows over data.max_row_bytes, byte-order
marks, CSV text that looks numeric, numeric sources. Each input is generated here; every row
read comes back once, as a row or a reject with a reason (rows in = rows out)."""

from __future__ import annotations

import io
import json
import resource
import time

import pytest

import s2l_ray.io.readers as readers
from s2l_ray.core import formats
from s2l_ray.io.readers import BOM, MAX_DEPTH, json_depth, parse_file

GOOD = {"instruction": "What is 1+1?", "output": "The answer is 2."}
GOOD_LINE = json.dumps(GOOD).encode()


def _rows(path: str, data: bytes, cap: int = 1 << 20) -> list[dict]:
    return [r for t in parse_file(path, data, cap) for r in t.to_pylist()]


def _reasons(rows: list[dict]) -> list[str | None]:
    return [r["reject_reason"] for r in rows]


def _nested(depth: int) -> bytes:
    return b'{"instruction": ' + b"[" * depth + b"]" * depth + b', "output": "x"}'


# ---------------------------------------------------------------------------------------------
# 1. deep nesting: one too_deep reject, fast, no RecursionError


def test_json_depth_counts_brackets_outside_strings() -> None:
    assert json_depth(b'{"a": "[[[[{{", "b": [[1]]}') == 3
    assert json_depth(b'["\\"[", [[]]]') == 3  # an escaped quote does not end the string
    assert json_depth(_nested(100_000)) == 100_001


@pytest.mark.parametrize("depth", [1_000, 100_000])
def test_deeply_nested_row_is_one_reject(depth: int) -> None:
    deep = _nested(depth)
    started = time.perf_counter()
    rows = _rows("/d/x.jsonl", GOOD_LINE + b"\n" + deep + b"\n" + GOOD_LINE + b"\n")
    assert _reasons(rows) == [None, "too_deep", None]
    assert str(MAX_DEPTH) in rows[1]["reject_detail"]
    # ... and the same item inside a JSON array file
    rows = _rows("/d/x.json", b"[" + GOOD_LINE + b"," + deep + b"," + GOOD_LINE + b"]")
    assert _reasons(rows) == [None, "too_deep", None]
    # "fast": loose (seconds, not the minutes json.loads took), a guard against a hang only
    assert time.perf_counter() - started < 30
    assert _reasons(_rows("/d/x.jsonl", _nested(MAX_DEPTH - 1))) == [None]  # the limit itself


# ---------------------------------------------------------------------------------------------
# 2. rows over data.max_row_bytes: rejected unread, in every format


def _huge(n_bytes: int) -> dict:
    return {"instruction": "Repeat the word.", "output": "w" * n_bytes}


def test_too_large_rows_in_every_format() -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    cap = 64 * 1024
    huge = _huge(4 * cap)
    jsonl = b"\n".join([GOOD_LINE, json.dumps(huge).encode(), GOOD_LINE])
    rows = _rows("/d/x.jsonl", jsonl, cap)
    assert _reasons(rows) == [None, "too_large", None]
    assert f"max_row_bytes={cap}" in rows[1]["reject_detail"]
    assert [r["origin_row"] for r in rows] == [0, 1, 2]

    arr = json.dumps([GOOD, huge, GOOD]).encode()
    assert _reasons(_rows("/d/x.json", arr, cap)) == [None, "too_large", None]

    csv = b"instruction,output\nq,a\nq2," + b"w" * (4 * cap) + b"\nq3,a\n"
    rows = _rows("/d/x.csv", csv, cap)
    assert _reasons(rows) == [None, "too_large", None]

    buf = io.BytesIO()
    pq.write_table(pa.table({"instruction": ["q", "q2", "q3"],
                             "output": ["a", "w" * (4 * cap), "a"]}), buf)
    rows = _rows("/d/x.parquet", buf.getvalue(), cap)
    assert _reasons(rows) == [None, "too_large", None]
    assert "'output'" in rows[1]["reject_detail"]  # names the field that is too large
    # nested text (a chat's messages) counts too
    buf = io.BytesIO()
    chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "w" * 2 * cap}]
    pq.write_table(pa.table({"messages": [chat, chat[:1]]}), buf)
    assert _reasons(_rows("/d/x.parquet", buf.getvalue(), cap)) == ["too_large", None]


def test_row_bytes_through_lists_and_structs() -> None:
    import pyarrow as pa

    arr = pa.array([[{"role": "u", "content": "abc"}], None, [], [{"role": None,
                                                                   "content": "x" * 10}]])
    assert readers.row_bytes(arr).tolist() == [4, 0, 0, 10]
    assert readers.row_bytes(arr.slice(2)).tolist() == [0, 10]
    assert readers.row_bytes(pa.array(["ab", None, "c"]).dictionary_encode()).tolist() == [2, 0, 1]


def test_over_large_line_is_never_held_whole(tmp_path) -> None:
    """Memory stays bounded by the cap: a 256 MB line is skipped in 1 MiB pieces. Peak RSS is
    printed, and only checked loosely (it must not grow by anything near the line's size)."""
    f = tmp_path / "big.jsonl"
    line_mb = 256
    with open(f, "wb") as out:
        out.write(GOOD_LINE + b"\n" + b'{"instruction": "q", "output": "')
        block = b"w" * (1 << 20)
        for _ in range(line_mb):
            out.write(block)
        out.write(b'"}\n' + GOOD_LINE + b"\n")
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # MiB (Linux: KiB)
    rows = [r for t in parse_file(str(f)) for r in t.to_pylist()]
    grew = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - before
    print(f"peak RSS grew by {grew:.0f} MiB reading a {line_mb} MiB line")
    assert _reasons(rows) == [None, "too_large", None]
    assert grew < line_mb / 2


# ---------------------------------------------------------------------------------------------
# 5. CSV text that looks numeric is text; 6. a byte-order mark is accepted; 9. numeric source


def test_csv_fields_are_text() -> None:
    rows = _rows("/d/x.csv", b"instruction,output,source,id\nWhat is 6*7?,42,3,7\n"
                             b"q,007,,8\n")
    objs = [json.loads(r["raw"]) for r in rows]
    assert objs[0] == {"instruction": "What is 6*7?", "output": "42", "source": "3", "id": "7"}
    assert objs[1]["output"] == "007"  # leading zeros kept: text, not a number
    ex = formats.to_example(objs[0])
    assert ex.response == "42"
    # quoted fields may span lines; a record with the wrong field count is rejected alone
    rows = _rows("/d/x.csv", b'instruction,output\n"two\nlines, ""quoted""",a\nq,a,extra\nq,a\n')
    assert _reasons(rows) == [None, "bad_csv", None]
    assert json.loads(rows[0]["raw"])["instruction"] == 'two\nlines, "quoted"'
    # a quote inside an unquoted field is text (it opens quoting only at a field's start)
    rows = _rows("/d/x.csv", b'instruction,output\nWhat is 5" in cm?,12.7\nq,"a ""b"""\n')
    assert [json.loads(r["raw"]) for r in rows] == [
        {"instruction": 'What is 5" in cm?', "output": "12.7"},
        {"instruction": "q", "output": 'a "b"'}]


@pytest.mark.parametrize("kind", ["jsonl", "json_lines", "json_array", "csv"])
def test_byte_order_mark_is_accepted(kind: str) -> None:
    data, path = {
        "jsonl": (GOOD_LINE + b"\n" + GOOD_LINE, "/d/x.jsonl"),
        "json_lines": (GOOD_LINE + b"\n" + GOOD_LINE, "/d/x.json"),
        "json_array": (json.dumps([GOOD, GOOD]).encode(), "/d/x.json"),
        "csv": (b"instruction,output\nWhat is 1+1?,The answer is 2.\nq,a\n", "/d/x.csv"),
    }[kind]
    rows = _rows(path, BOM + data)
    assert _reasons(rows) == [None, None]
    assert json.loads(rows[0]["raw"]) == GOOD


def test_numeric_source_keeps_the_row() -> None:
    for value, text in [(3, "3"), (2.5, "2.5"), (True, "true"), ({"a": 1}, '{"a": 1}')]:
        assert formats.row_source({"source": value}, "source") == text


# ---------------------------------------------------------------------------------------------
# the JSON array splitter, whatever the read piece size


@pytest.mark.parametrize("piece", [1, 2, 3, 7, 64])
def test_array_items_split_across_any_piece_boundary(monkeypatch: pytest.MonkeyPatch,
                                                     piece: int) -> None:
    monkeypatch.setattr(readers, "READ_BYTES", piece)
    want = [GOOD, {"a": 'x\\"]\\', "b": [[1], {"c": "]"}]}, {"d": "\u00e9,["}]
    rows = _rows("/d/x.json", b"  " + json.dumps(want).encode() + b" \n")
    assert [json.loads(r["raw"]) for r in rows] == want
    assert _rows("/d/x.json", b" [ ] ") == []
    assert _reasons(_rows("/d/x.json", b"[{}, {")) == [None, "bad_json"]
    assert _reasons(_rows("/d/x.json", b"[{}] trailing")) == [None, "bad_json"]
    assert _reasons(_rows("/d/x.json", b"[{},,{}]")) == [None, "bad_json", None]
