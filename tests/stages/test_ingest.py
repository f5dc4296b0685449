"""Ingest stage on a real local Ray: every format, every bad row accounted, stable ids, resume."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from s2l_ray.config import ConfigError
from s2l_ray.demo.data import KINDS, SOURCES, row_labels
from s2l_ray.stages.ingest import IngestError
from s2l_ray.stages.registry import run_stage
from tests.conftest import make_cfg

pytestmark = pytest.mark.ray


def _read(path: Path) -> list[dict]:
    return pq.read_table(path).to_pylist() if path.exists() else []


def _write_mixed(folder: Path) -> int:
    """A folder in four file types, good and bad rows mixed. Returns the number of input rows."""
    folder.mkdir(parents=True)
    lines = [
        json.dumps({"instruction": "What is 1+1?", "output": "The answer is 2.", "source": "a"}),
        json.dumps({"instruction": "Add", "input": "3 and 4", "output": "7", "source": "b"}),
        json.dumps({"messages": [{"role": "user", "content": "Say hi"},
                                 {"role": "assistant", "content": "hi"}], "source": "c"}),
        json.dumps({"instruction": "", "output": "x"}),          # empty_field
        json.dumps({"instruction": "q", "output": 5}),           # wrong_type
        json.dumps({"prompt": "q", "completion": "a"}),          # unknown_format
        "{oops",                                                 # bad_json
    ]
    # ... and one undecodable line
    (folder / "a.jsonl").write_bytes("\n".join(lines).encode() + b"\n\xff\xfe\x00\n")
    (folder / "b.json").write_text(json.dumps([
        {"instruction": "What is 2+2?", "output": "The answer is 4.", "source": "a"}, 17]))
    pq.write_table(pa.table({"instruction": ["What is 3+3?", "What is 4+4?"],
                             "output": ["The answer is 6.", None],          # missing_field
                             "source": ["d", "d"]}), folder / "c.parquet")
    (folder / "d.csv").write_text("instruction,output,source\nWhat is 5+5?,The answer is 10.,e\n")
    (folder / "ignored.txt").write_text("not data")
    return len(lines) + 1 + 2 + 2 + 1


def test_mixed_folder_every_row_accounted(tmp_path: Path, ray_local, tiny_ref: str) -> None:
    n_in = _write_mixed(tmp_path / "data")
    stage = run_stage(make_cfg(tmp_path, tiny_ref, f"data.source={tmp_path / 'data'}"), "ingest")
    examples = _read(stage.path / "examples")
    rejects = _read(stage.path / "rejects")
    report = stage.report()
    assert len(examples) + len(rejects) == n_in == report["rows"]
    assert report["valid"] == len(examples) == 6
    assert report["rejects"] == {"empty_field": 1, "wrong_type": 1, "unknown_format": 1,
                                 "bad_json": 1, "undecodable_text": 1, "not_an_object": 1,
                                 "missing_field": 1}
    assert sorted(e["format"] for e in examples) == ["alpaca", "chat"] + ["mathinstruct"] * 4
    assert report["sources"] == {"a": 2, "b": 1, "c": 1, "d": 1, "e": 1}
    for r in rejects:
        assert r["reject_reason"] and r["reject_detail"] and r["origin_file"]
    for e in examples:  # tokens are the shared tokenization's: prompt then response then eos
        assert e["n_tokens"] == len(e["input_ids"]) > e["n_prompt_tokens"] > 0
    assert (stage.path / "_SUCCESS.json").is_file() and (stage.path / "config.yaml").is_file()


def test_ids_stable_across_files_and_parallelism(tmp_path: Path, ray_local, tiny_ref: str) -> None:
    rows = [{"instruction": f"What is {i}+{i}?", "output": f"The answer is {2 * i}."}
            for i in range(300)]
    one = tmp_path / "one"
    one.mkdir()
    (one / "all.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    many = tmp_path / "many"
    many.mkdir()
    for k in range(5):  # same rows, other files, other order, other whitespace
        part = rows[k::5][::-1]
        (many / f"p{k}.jsonl").write_text("\n".join(
            json.dumps({**r, "instruction": r["instruction"] + "  "}) for r in part))
    s1 = run_stage(make_cfg(tmp_path / "r1", tiny_ref, f"data.source={one}"), "ingest")
    s2 = run_stage(make_cfg(tmp_path / "r2", tiny_ref, f"data.source={many}"), "ingest")
    ids1 = sorted(r["id"] for r in _read(s1.path / "examples"))
    ids2 = sorted(r["id"] for r in _read(s2.path / "examples"))
    assert ids1 == ids2 and len(set(ids1)) == 300


def test_duplicates_keep_first_and_given_ids(tmp_path: Path, ray_local, tiny_ref: str) -> None:
    d = tmp_path / "d"
    d.mkdir()
    rows = [{"uid": "x1", "instruction": "q1", "output": "a1"},
            {"uid": "x2", "instruction": "q2", "output": "a2"},
            {"uid": "x1", "instruction": "q3", "output": "a3"},   # repeated id, other content
            {"uid": "", "instruction": "q4", "output": "a4"}]     # bad id
    (d / "a.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    cfg = make_cfg(tmp_path, tiny_ref, f"data.source={d}", "data.id_column=uid")
    stage = run_stage(cfg, "ingest")
    ex = {e["id"]: e for e in _read(stage.path / "examples")}
    assert sorted(ex) == ["x1", "x2"] and ex["x1"]["response"] == "a1"
    rej = {r["reject_reason"]: r for r in _read(stage.path / "rejects")}
    assert set(rej) == {"duplicate_id", "bad_id"}
    assert rej["duplicate_id"]["origin_row"] == 2 and "a.jsonl:0" in rej["duplicate_id"][
        "reject_detail"]
    with pytest.raises(IngestError, match="data.duplicates=reject"):
        run_stage(make_cfg(tmp_path / "strict", tiny_ref, f"data.source={d}",
                            "data.id_column=uid", "data.duplicates=error"), "ingest")


def test_overlong_reject_vs_truncate_and_zero_valid(tmp_path: Path, ray_local,
                                                    tiny_ref: str) -> None:
    d = tmp_path / "d"
    d.mkdir()
    (d / "a.jsonl").write_text("\n".join(json.dumps(r) for r in [
        {"instruction": "short", "output": "ok"},
        {"instruction": "long", "output": "word " * 200}]))
    rej = run_stage(make_cfg(tmp_path / "rej", tiny_ref, f"data.source={d}", "data.template=plain",
                              "data.max_length=64", "data.overlong=reject"), "ingest")
    assert rej.report()["valid"] == 1 and rej.report()["rejects"] == {"overlong": 1}
    cut = run_stage(make_cfg(tmp_path / "cut", tiny_ref, f"data.source={d}", "data.template=plain",
                              "data.max_length=64"), "ingest")
    assert cut.report()["valid"] == 2 and cut.report()["truncated"] == 1
    assert cut.report()["max_tokens"] == 64
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "x.jsonl").write_text('{"a": 1}\n{"b": 2}\n')
    cfg = make_cfg(tmp_path / "zero", tiny_ref, f"data.source={bad}")
    with pytest.raises(IngestError, match=r"no valid rows.*unknown_format"):
        run_stage(cfg, "ingest")
    assert not (tmp_path / "zero" / "out" / "ingest").exists()


def test_hf_dataset_from_disk(tmp_path: Path, ray_local, tiny_ref: str) -> None:
    import datasets

    ds = datasets.Dataset.from_list([{"instruction": f"q{i}", "input": "", "output": f"a{i}"}
                                     for i in range(20)])
    datasets.DatasetDict({"train": ds}).save_to_disk(str(tmp_path / "hfds"))
    stage = run_stage(make_cfg(tmp_path, tiny_ref, f"data.source=hf:{tmp_path / 'hfds'}"), "ingest")
    ex = _read(stage.path / "examples")
    assert len(ex) == 20 and {e["format"] for e in ex} == {"alpaca"}
    assert sorted(e["origin_row"] for e in ex) == list(range(20))


def test_demo_rerun_skips_and_config_change_is_caught(tmp_path: Path, ray_local,
                                                      tiny_ref: str) -> None:
    cfg = make_cfg(tmp_path, tiny_ref, "demo.n_train=300", "demo.n_test_per_source=5")
    stage = run_stage(cfg, "ingest")
    rep = stage.report()
    assert rep["rows"] == 300 and rep["valid"] + rep["rejected"] == 300
    assert set(rep["sources"]) == set(SOURCES)  # the demo's sources, each mixing kinds
    assert (stage.path / "demo_data" / "test.jsonl").is_file()
    # the generator's labels (kind, wrong) travel with every example, in its raw row
    ex = _read(stage.path / "examples")
    labels = [row_labels(e["raw"]) for e in ex]
    assert {lab["kind"] for lab in labels} == set(KINDS)
    assert all(isinstance(lab["wrong"], bool) for lab in labels) and any(
        lab["wrong"] for lab in labels)
    marker = (stage.path / "_SUCCESS.json").read_text()
    run_stage(cfg, "ingest")  # done: skipped, marker untouched
    assert (stage.path / "_SUCCESS.json").read_text() == marker
    changed = make_cfg(tmp_path, tiny_ref, "demo.n_train=301", "demo.n_test_per_source=5")
    with pytest.raises(ConfigError, match="run.overwrite=true"):
        run_stage(changed, "ingest")


def test_progress_counts_parts_as_written(tmp_path: Path, ray_local, tiny_ref: str,
                                          caplog: pytest.LogCaptureFixture) -> None:
    """Ingest's progress lines advance while the parts are written (a short cadence), not only
    at the end; and cutting the same rows into smaller parts changes neither the rows nor
    their order (parts sorted by name are the input order)."""
    import logging
    import re

    from s2l_ray.stages.ingest import normalize_to_parts

    d = tmp_path / "d"
    d.mkdir()
    n_files, per_file = 6, 400
    for k in range(n_files):
        (d / f"p{k}.jsonl").write_text("\n".join(json.dumps(
            {"instruction": f"What is {i} plus {k}? Show the steps " + "and more " * (i % 7),
             "output": f"First {i}, then {k}: the answer is {i + k}."})
            for i in range(per_file)))
    total = n_files * per_file
    cfg = make_cfg(tmp_path, tiny_ref, f"data.source={d}", "run.progress_seconds=0.02")
    tok = cfg.reference.model
    caplog.set_level(logging.INFO, logger="s2l_ray.stages.ingest")
    stats, speed = normalize_to_parts(cfg, str(d), tok, tmp_path / "small", rows_per_part=200)
    counts = [int(n.replace(",", "")) for n in re.findall(r"ingest: ([\d,]+) rows", caplog.text)]
    assert stats["rows"] == speed["done"] == total == counts[-1]
    assert any(0 < c < total for c in counts), counts  # counts arrived before the end
    assert counts == sorted(counts)
    whole, _ = normalize_to_parts(cfg, str(d), tok, tmp_path / "whole")
    assert whole == stats

    def rows(out: str) -> tuple[int, list[dict]]:
        parts = sorted((tmp_path / out / "examples").glob("part-*.parquet"))
        key = ["origin_file", "origin_row", "id", "input_ids"]
        return len(parts), [r for p in parts for r in pq.read_table(p, columns=key).to_pylist()]

    (n_small, small), (n_whole, every) = rows("small"), rows("whole")
    assert (n_small, n_whole) == (total // 200, n_files)  # a file: two ranges, or one
    assert small == every and len(every) == total


def _write_ranged(folder: Path) -> None:
    """Files that ranges cut: JSON Lines with blank, bad, CRLF-ended and over-cap lines, a BOM
    and no final newline, ids repeated within and across files; Parquet in row groups of 5;
    and the kinds read whole (a JSON array, CSV)."""
    folder.mkdir(parents=True)

    def row(i: int) -> bytes:
        return json.dumps({"instruction": f"What is {i % 37} times 3?",  # ids repeat
                           "output": f"It is {3 * (i % 37)}.", "source": f"s{i % 3}"}).encode()

    lines = []
    for i in range(120):
        lines.append(b"" if i % 11 == 5 else b"{oops" if i % 13 == 0 else
                     b'{"instruction": "' + b"w" * 3000 + b'", "output": "x"}' if i % 17 == 0
                     else row(i))
    (folder / "a.jsonl").write_bytes(b"\xef\xbb\xbf" + b"\n".join(lines))
    (folder / "b.json").write_bytes(b"\r\n".join(row(i + 7) for i in range(40)) + b"\r\n")
    pq.write_table(pa.table({"instruction": [f"What is {i} times 3?" for i in range(33)],
                             "output": [f"It is {3 * i}." if i % 4 else None for i in range(33)]}),
                   folder / "c.parquet", row_group_size=5)
    (folder / "d.json").write_text(json.dumps([{"instruction": "q", "output": "a"}] * 3))
    (folder / "e.csv").write_text("instruction,output\n" + "".join(
        f"What is {i} times 3?,It is {3 * i}.\n" for i in range(9)))


def test_tiny_ranges_same_examples_and_rejects(tmp_path: Path, ray_local, tiny_ref: str) -> None:
    """The same input cut into ranges of a few rows (many tasks, a big JSON Lines file among
    them split into several) or read one range per file: the same examples and rejects, row for
    row in sorted-part order, and the same counts and duplicate decisions."""
    from s2l_ray.io.readers import list_files, plan_ranges
    from s2l_ray.stages.ingest import normalize_to_parts

    d = tmp_path / "d"
    _write_ranged(d)
    cfg = make_cfg(tmp_path, tiny_ref, f"data.source={d}", "data.max_row_bytes=2000")
    tok = cfg.reference.model
    tiny, _ = normalize_to_parts(cfg, str(d), tok, tmp_path / "tiny", rows_per_part=3)
    whole, _ = normalize_to_parts(cfg, str(d), tok, tmp_path / "whole", rows_per_part=1 << 20)
    assert tiny == whole and whole["rows"] == 120 - 11 + 40 + 33 + 3 + 9  # 11 blank lines
    assert {"duplicate_id", "bad_json", "too_large", "missing_field"} <= set(whole["rejects"])

    def content(out: str, sub: str) -> tuple[list[str], list[dict]]:
        parts = sorted((tmp_path / out / sub).glob("part-*.parquet"))
        return [p.name for p in parts], [r for p in parts for r in pq.read_table(p).to_pylist()]

    for sub in ("examples", "rejects"):
        (names_tiny, rows_tiny), (names_whole, rows_whole) = content("tiny", sub), content(
            "whole", sub)
        assert rows_tiny == rows_whole and len(names_tiny) > len(names_whole)
    # a.jsonl (120 lines) was planned as 40 ranges of 3 lines, each read by one task, which
    # wrote one part named by its first row (rows cut by one task would be named otherwise:
    # the blank lines hold no row)
    ranges = [r for r in plan_ranges(list_files(str(d)), 3) if r.path.endswith("a.jsonl")]
    assert [r.first_row for r in ranges] == list(range(0, 120, 3))
    written = {*content("tiny", "examples")[0], *content("tiny", "rejects")[0]}
    first_rows = sorted(int(n[11:23]) for n in written if n.startswith("part-00000-"))
    assert [r // 3 for r in first_rows] == list(range(40))
