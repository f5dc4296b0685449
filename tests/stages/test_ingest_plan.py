"""Ingest's range planning (readers.plan_ranges), Ray-free: the rows read range by range, and
their origins, are exactly those of one pass over the whole file."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from s2l_ray.io import readers
from s2l_ray.io.readers import BOM, FileRange, parse_file, plan_ranges

GOOD = json.dumps({"instruction": "What is 1+1?", "output": "The answer is 2."}).encode()


def _rows(path: Path, cap: int = 1 << 20, span: FileRange | None = None) -> list[dict]:
    return [r for t in parse_file(str(path), max_row_bytes=cap, span=span) for r in t.to_pylist()]


def _by_ranges(path: Path, rows: int, max_bytes: int = 1 << 30,
               cap: int = 1 << 20) -> tuple[list[FileRange], list[dict]]:
    ranges = plan_ranges([str(path)], rows, max_bytes)
    return ranges, [r for span in ranges for r in _rows(path, cap, span)]


def test_jsonl_cut_at_line_ends_numbered_from_the_file_start(tmp_path: Path) -> None:
    f = tmp_path / "a.jsonl"
    data = b"{}\n\n" + GOOD + b"\n  \n" + GOOD  # a blank line, a spaces-only one, no final \n
    f.write_bytes(data)
    ranges = plan_ranges([str(f)], rows=2)
    assert [r.first_row for r in ranges] == [0, 2, 4]
    assert ranges[0].start == 0 and ranges[-1].stop == len(data)
    for a, b in itertools.pairwise(ranges):
        assert a.stop == b.start and data[a.stop - 1:a.stop] == b"\n"
        assert data[:b.start].count(b"\n") == b.first_row  # the line number of its first line
    _, rows = _by_ranges(f, 2)
    assert [r["origin_row"] for r in rows] == [0, 2, 4] == [r["origin_row"] for r in _rows(f)]


@pytest.mark.parametrize("scan", [1, 3, 64, 8 << 20])
def test_ranges_read_the_same_rows_as_the_whole_file(tmp_path: Path, scan: int,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Blank lines, a BOM on line 0, CRLF, bad lines, an over-cap line longer than a range's
    byte target (the cut cannot fall inside it), with and without a final newline; line ends
    counted across any piece boundary of the scan."""
    monkeypatch.setattr(readers, "SCAN_BYTES", scan)
    huge = b'{"instruction": "' + b"w" * 300 + b'", "output": "x"}'
    lines = [GOOD, b"", b"{oops", huge, GOOD, b"   ", b"[1]", GOOD, huge, b"", GOOD]
    cases = {"bom.jsonl": BOM + b"\n".join(lines) + b"\n",
             "crlf.jsonl": b"\r\n".join(lines),
             "lines.json": b"\n".join(lines) + b"\n\n",
             "one.jsonl": GOOD}
    for name, data in cases.items():
        f = tmp_path / name
        f.write_bytes(data)
        for cap in (200, 1 << 20):  # the long lines rejected too_large, or read
            whole = _rows(f, cap)
            assert whole and whole[0]["raw"] is not None  # the BOM is skipped on line 0
            for rows, max_bytes in [(1, 1 << 30), (2, 1 << 30), (3, 100), (100, 1),
                                    (100, 1 << 30)]:
                ranges, got = _by_ranges(f, rows, max_bytes, cap)
                assert got == whole, (name, cap, rows, max_bytes, ranges)
                if rows == 100 and max_bytes > 1:
                    assert len(ranges) == 1
    assert len(plan_ranges([str(tmp_path / "bom.jsonl")], 100, 1)) == len(lines)  # one a line


def test_over_cap_line_straddling_a_byte_target(tmp_path: Path) -> None:
    f = tmp_path / "a.jsonl"
    f.write_bytes(GOOD + b"\n" + b'{"x": "' + b"w" * 1000 + b'"}\n' + GOOD + b"\n")
    ranges = plan_ranges([str(f)], rows=100, max_bytes=len(GOOD) + 10)  # target inside line 1
    assert [(r.first_row, r.stop) for r in ranges] == [(0, len(GOOD) + 1 + 1010),
                                                       (2, f.stat().st_size)]
    _, rows = _by_ranges(f, 100, len(GOOD) + 10, cap=100)
    assert [(r["origin_row"], r["reject_reason"]) for r in rows] == [
        (0, None), (1, "too_large"), (2, None)]


def test_empty_files_and_files_that_stay_whole(tmp_path: Path) -> None:
    (tmp_path / "empty.jsonl").write_bytes(b"")
    (tmp_path / "newlines.jsonl").write_bytes(b"\n\n\n")
    (tmp_path / "arr.json").write_text(json.dumps([{"a": i} for i in range(10)]))
    (tmp_path / "t.csv").write_text("instruction,output\n" + "q,a\n" * 10)
    files = [str(tmp_path / n) for n in ("empty.jsonl", "newlines.jsonl", "arr.json", "t.csv")]
    ranges = plan_ranges(files, rows=2)
    assert ranges[0] == FileRange(files[0], 0, 0, 0)  # one empty range: no rows
    assert [r.first_row for r in ranges[1:3]] == [0, 2]  # 3 blank lines, cut after 2
    assert ranges[3:] == [FileRange(files[2]), FileRange(files[3])]  # cannot be cut
    assert [r for span in ranges[:3] for r in _rows(Path(span.path), span=span)] == []
    assert len(_rows(Path(files[2]), span=ranges[3])) == 10
    with pytest.raises(ValueError, match="rows"):
        plan_ranges(files, rows=0)


def test_parquet_cut_at_row_offsets_inside_row_groups(tmp_path: Path) -> None:
    f = tmp_path / "a.parquet"
    n = 23
    pq.write_table(pa.table({"instruction": [f"q{i}" for i in range(n)],
                             "output": ["a" * (i * 7) for i in range(n)]}), f, row_group_size=5)
    whole = _rows(f, cap=100)
    assert [r["reject_reason"] for r in whole].count("too_large") > 0
    for rows in (1, 4, 5, 7, 23, 100):
        ranges, got = _by_ranges(f, rows, cap=100)
        assert got == whole
        assert len(ranges) == -(-n // rows)
        assert [r.first_row for r in ranges] == [r.start for r in ranges]
    meta = pq.ParquetFile(f).metadata
    size = sum(meta.row_group(g).total_byte_size for g in range(meta.num_row_groups))
    by_bytes = plan_ranges([str(f)], rows=100, max_bytes=size // 4)  # large rows: fewer a range
    assert 4 <= len(by_bytes) <= 6
    (tmp_path / "bad.parquet").write_bytes(b"PAR1garbage")
    assert plan_ranges([str(tmp_path / "bad.parquet")], 1) == [
        FileRange(str(tmp_path / "bad.parquet"))]  # read whole: its reader rejects it
