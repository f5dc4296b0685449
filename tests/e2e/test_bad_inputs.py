"""A corpus of bad inputs, run through the CLI and the ingest stage on a real local Ray.

Each input either fails with a clear message (exit code 2, the key or the file named, a fix) or
has its rows rejected with a reason; a failure publishes nothing (no `ingest/` folder, no
`_SUCCESS.json`). Row-level reasons on mixed folders, stable ids and the basic overlong and
duplicate cases are in tests/stages/test_ingest.py; this file adds the inputs that end a run, and
sizes and shapes that one does not expect.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from s2l_ray.cli import main
from s2l_ray.config import ConfigError
from s2l_ray.stages.ingest import IngestError
from s2l_ray.stages.registry import run_stage
from tests.conftest import make_cfg

pytestmark = pytest.mark.ray

GOOD = {"instruction": "What is 1+1?", "output": "The answer is 2."}


def _config(tmp_path: Path, model: str) -> Path:
    """A pipeline YAML for the CLI, writing under tmp_path/out with the tiny model."""
    f = tmp_path / "cfg.yaml"
    f.write_text(f"run:\n  output_dir: {tmp_path / 'out'}\nreference:\n  model: {model}\n"
                 f"target:\n  model: {model}\n")
    return f


def _nothing_published(out: Path) -> None:
    assert not (out / "ingest").exists(), "a failed ingest must not publish ingest/"
    if out.exists():
        assert not list(out.rglob("_SUCCESS.json"))


def _fails_clearly(tmp_path: Path, model: str, caplog: pytest.LogCaptureFixture,
                   *overrides: str, expect: tuple[str, ...]) -> None:
    """`s2l ingest` exits 2 with one log line naming `expect` and a fix; nothing published."""
    caplog.clear()
    assert main(["ingest", str(_config(tmp_path, model)), *overrides]) == 2
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert errors, caplog.text
    for word in (*expect, "Fix:"):
        assert word in errors[-1], errors[-1]
    assert "Traceback" not in caplog.text
    _nothing_published(tmp_path / "out")


def test_empty_file(tmp_path: Path, ray_local, tiny_ref: str,
                    caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / "empty.jsonl").write_bytes(b"")
    _fails_clearly(tmp_path, tiny_ref, caplog, f"data.source={tmp_path / 'empty.jsonl'}",
                   expect=("empty.jsonl", "no rows"))


def test_empty_folder_and_wrong_extension(tmp_path: Path, tiny_ref: str,
                                          caplog: pytest.LogCaptureFixture) -> None:
    # Refused by the pre-flight checks: no Ray, no output folder at all.
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "notes.txt").write_text("not data")
    _fails_clearly(tmp_path, tiny_ref, caplog, f"data.source={tmp_path / 'd'}",
                   expect=("data.source", "has no"))
    _fails_clearly(tmp_path, tiny_ref, caplog, f"data.source={tmp_path / 'd' / 'notes.txt'}",
                   expect=("data.source", "notes.txt"))
    assert not (tmp_path / "out").exists()


def test_wrong_schema_json_array(tmp_path: Path, ray_local, tiny_ref: str,
                                 caplog: pytest.LogCaptureFixture) -> None:
    rows = [{"question": f"q{i}", "answer": f"a{i}"} for i in range(20)]
    (tmp_path / "qa.json").write_text(json.dumps(rows))
    _fails_clearly(tmp_path, tiny_ref, caplog, f"data.source={tmp_path / 'qa.json'}",
                   expect=("no valid rows", "unknown_format", "data.format"))
    # A format forced on the wrong rows names the missing field instead.
    _fails_clearly(tmp_path, tiny_ref, caplog, f"data.source={tmp_path / 'qa.json'}",
                   "data.format=mathinstruct", expect=("no valid rows", "missing_field"))


def test_binary_garbage(tmp_path: Path, ray_local, tiny_ref: str,
                        caplog: pytest.LogCaptureFixture) -> None:
    garbage = random.Random(0).randbytes(64 * 1024)
    (tmp_path / "garbage.jsonl").write_bytes(garbage)
    _fails_clearly(tmp_path, tiny_ref, caplog, f"data.source={tmp_path / 'garbage.jsonl'}",
                   expect=("no valid rows",))
    # Among good files, garbage (here also a corrupt Parquet) is rejected row by row.
    d = tmp_path / "mixed"
    d.mkdir()
    (d / "garbage.jsonl").write_bytes(garbage)
    (d / "broken.parquet").write_bytes(garbage[:4096])
    (d / "good.jsonl").write_text(json.dumps(GOOD) + "\n")
    stage = run_stage(make_cfg(tmp_path / "m", tiny_ref, f"data.source={d}"), "ingest")
    report = stage.report()
    assert report["valid"] == 1
    assert report["rejects"]["unreadable_file"] == 1
    assert set(report["rejects"]) <= {"unreadable_file", "undecodable_text", "bad_json",
                                      "not_an_object"}
    assert report["rows"] == report["valid"] + report["rejected"]
    rejects = pq.read_table(stage.path / "rejects").to_pylist()
    assert all(r["reject_detail"] for r in rejects)
    assert {Path(r["origin_file"]).name for r in rejects} == {"garbage.jsonl", "broken.parquet"}


@pytest.mark.parametrize("policy", ["reject", "truncate"])
def test_huge_row(tmp_path: Path, ray_local, tiny_ref: str, policy: str) -> None:
    d = tmp_path / "d"
    d.mkdir()
    huge = {"instruction": "Repeat the word.", "output": "word " * (1 << 20)}  # a 5 MB output
    (d / "a.jsonl").write_text(json.dumps(GOOD) + "\n" + json.dumps(huge) + "\n")
    stage = run_stage(make_cfg(tmp_path, tiny_ref, f"data.source={d}", "data.max_length=128",
                               f"data.overlong={policy}", f"data.max_row_bytes={8 << 20}"),
                      "ingest")
    report = stage.report()
    examples = pq.read_table(stage.path / "examples").to_pylist()
    if policy == "reject":
        assert report["valid"] == 1 and report["rejects"] == {"overlong": 1}
        (rej,) = pq.read_table(stage.path / "rejects").to_pylist()
        assert rej["reject_reason"] == "overlong" and "128" in rej["reject_detail"]
    else:
        assert report["valid"] == 2 and report["truncated"] == 1
        assert max(e["n_tokens"] for e in examples) == 128 == report["max_tokens"]


def test_duplicate_ids(tmp_path: Path, ray_local, tiny_ref: str,
                       caplog: pytest.LogCaptureFixture) -> None:
    d = tmp_path / "d"
    d.mkdir()
    for k in range(2):  # id "x" three times over two files, "y" once
        (d / f"p{k}.jsonl").write_text("\n".join(json.dumps(
            {"uid": uid, "instruction": f"q{k}{i}", "output": "a"})
            for i, uid in enumerate(["x", "y"] if k == 0 else ["x", "x"])))
    _fails_clearly(tmp_path, tiny_ref, caplog, f"data.source={d}", "data.id_column=uid",
                   "data.duplicates=error", expect=("ids repeat", "data.duplicates=reject"))
    stage = run_stage(make_cfg(tmp_path / "r", tiny_ref, f"data.source={d}",
                                "data.id_column=uid"), "ingest")
    assert stage.report()["rejects"] == {"duplicate_id": 2} and stage.report()["valid"] == 2
    kept = {e["id"]: e for e in pq.read_table(stage.path / "examples").to_pylist()}
    assert kept["x"]["origin_file"].endswith("p0.jsonl") and kept["x"]["origin_row"] == 0


def test_nonexistent_model_path(tmp_path: Path, tiny_ref: str,
                                caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / "a.jsonl").write_text(json.dumps(GOOD) + "\n")
    missing = tmp_path / "no_such_model"
    _fails_clearly(tmp_path, tiny_ref, caplog, f"data.source={tmp_path / 'a.jsonl'}",
                   f"reference.model={missing}", expect=("reference.model", str(missing)))
    assert not (tmp_path / "out").exists()  # refused before any work, Ray not even started
    cfg = make_cfg(tmp_path, tiny_ref, f"data.source={tmp_path / 'a.jsonl'}",
                   f"target.model={missing}")
    with pytest.raises(ConfigError, match="target.model"):
        run_stage(cfg, "ingest")


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions")
def test_unwritable_output_dir(tmp_path: Path, tiny_ref: str,
                               caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / "a.jsonl").write_text(json.dumps(GOOD) + "\n")
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        caplog.clear()
        assert main(["ingest", str(_config(tmp_path, tiny_ref)),
                     f"run.output_dir={locked / 'out'}",
                     f"data.source={tmp_path / 'a.jsonl'}"]) == 2
        assert "run.output_dir" in caplog.text and "Fix:" in caplog.text
        assert not (locked / "out").exists()
    finally:
        locked.chmod(0o700)


def test_output_dir_that_cannot_be_created(tmp_path: Path, tiny_ref: str,
                                           caplog: pytest.LogCaptureFixture) -> None:
    # Also as root (which ignores permissions): a file where a parent folder should be.
    (tmp_path / "a.jsonl").write_text(json.dumps(GOOD) + "\n")
    (tmp_path / "plain_file").write_text("x")
    caplog.clear()
    assert main(["ingest", str(_config(tmp_path, tiny_ref)),
                 f"run.output_dir={tmp_path / 'plain_file' / 'out'}",
                 f"data.source={tmp_path / 'a.jsonl'}"]) == 2
    assert "run.output_dir" in caplog.text and "Fix:" in caplog.text
    assert "Traceback" not in caplog.text


def test_failed_ingest_leaves_earlier_result_alone(tmp_path: Path, ray_local,
                                                   tiny_ref: str) -> None:
    # A rerun with overwrite on bad input must not destroy the result that is published.
    d = tmp_path / "d"
    d.mkdir()
    (d / "a.jsonl").write_text(json.dumps(GOOD) + "\n")
    stage = run_stage(make_cfg(tmp_path, tiny_ref, f"data.source={d}"), "ingest")
    marker = (stage.path / "_SUCCESS.json").read_text()
    (d / "a.jsonl").write_text('{"a": 1}\n')
    with pytest.raises(IngestError, match="no valid rows"):
        run_stage(make_cfg(tmp_path, tiny_ref, f"data.source={d}", "data.template=plain",
                            "run.overwrite=true"), "ingest")
    assert (stage.path / "_SUCCESS.json").read_text() == marker


# ---------------------------------------------------------------------------------------------
# hostile rows (issue 17): each file generated here; rows in = examples + rejects for all

def _deep(depth: int, tag: str) -> str:
    return '{"instruction": "' + tag + '", "output": ' + "[" * depth + "]" * depth + "}"


def test_hostile_rows_through_ingest(tmp_path: Path, ray_local, tiny_ref: str) -> None:
    import pyarrow as pa

    cap = 64 * 1024
    huge = "w" * (4 * cap)

    def good(i: int) -> dict:
        return {"instruction": f"What is {i}+1?", "output": f"The answer is {i + 1}."}

    d = tmp_path / "d"
    d.mkdir()
    bom = b"\xef\xbb\xbf"
    # 20,000 levels: 40 KB, under the cap, so too_deep (not too_large) is the reason
    (d / "deep.jsonl").write_text("\n".join([json.dumps(good(0)), _deep(1_000, "a"),
                                             json.dumps(good(1)), _deep(20_000, "b")]))
    (d / "big.jsonl").write_text(json.dumps(good(2)) + "\n" + json.dumps(
        {"instruction": "big", "output": huge}) + "\n")
    (d / "big.json").write_bytes(bom + b"[" + b",".join([
        json.dumps(good(3)).encode(), json.dumps({"instruction": "big", "output": huge}).encode(),
        _deep(1_000, "c").encode()]) + b"]")
    (d / "bom.jsonl").write_bytes(bom + (json.dumps(good(4)) + "\n" + json.dumps(good(5))
                                         ).encode())
    (d / "numeric.csv").write_bytes(bom + f"instruction,output,source\nWhat is 6*7?,42,3\n"
                                          f"big,{huge},s\n".encode())
    pq.write_table(pa.table({"instruction": ["big", "What is 8+1?"], "output": [huge, "9"]}),
                   d / "big.parquet")
    (d / "source.jsonl").write_text(json.dumps({**good(9), "source": 7}) + "\n")

    stage = run_stage(make_cfg(tmp_path, tiny_ref, f"data.source={d}",
                               f"data.max_row_bytes={cap}"), "ingest")
    report = stage.report()
    assert report["rejects"] == {"too_deep": 3, "too_large": 4}
    assert report["valid"] == 9
    assert report["rows"] == report["valid"] + report["rejected"] == 16
    assert report["sources"]["3"] == 1 and report["sources"]["7"] == 1  # numbers as text
    examples = pq.read_table(stage.path / "examples").to_pylist()
    assert {e["response"] for e in examples} >= {"42", "9", "The answer is 5."}  # BOM rows too
    rejects = pq.read_table(stage.path / "rejects").to_pylist()
    where = sorted((Path(r["origin_file"]).name, r["origin_row"], r["reject_reason"])
                   for r in rejects)
    assert where == [("big.json", 1, "too_large"), ("big.json", 2, "too_deep"),
                     ("big.jsonl", 1, "too_large"), ("big.parquet", 0, "too_large"),
                     ("deep.jsonl", 1, "too_deep"), ("deep.jsonl", 3, "too_deep"),
                     ("numeric.csv", 1, "too_large")]
    assert all(r["reject_detail"] for r in rejects)


@pytest.mark.parametrize(("override", "key"), [("cluster.k=100000", "cluster.k"),
                                               ("reference.num_checkpoints=500",
                                                "reference.num_checkpoints")])
def test_impossible_counts_caught_before_training(tmp_path: Path, ray_local, tiny_ref: str,
                                                  caplog: pytest.LogCaptureFixture,
                                                  override: str, key: str) -> None:
    caplog.clear()
    assert main(["run", str(_config(tmp_path, tiny_ref)), "demo.n_train=60",
                 "demo.n_test_per_source=1", "reference.batch_size=2", "reference.grad_accum=1",
                 "reference.epochs=1", "cluster.k=4", override]) == 2
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert key in errors[-1] and "Fix:" in errors[-1], errors
    out = tmp_path / "out"
    assert (out / "ingest" / "_SUCCESS.json").is_file()  # ingest ran: the counts come from it
    assert sorted(p.name for p in out.iterdir()) == ["ingest"]  # nothing after it started
