"""Trajectories resume mid-stage: a run SIGKILLed (driver and its private Ray) after some group
files are written, then rerun: only the missing groups are scored, a damaged group file and a
half-written .part are redone (never trusted), and every group file is byte-identical to an
uninterrupted run's. Plus the group-file checks themselves, without Ray."""

from __future__ import annotations

import json
import logging
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from s2l_ray.config import dump_config
from s2l_ray.core.losses import ScoreStats
from s2l_ray.stages.registry import run_stage
from s2l_ray.stages.trajectories import (
    check_group,
    group_file,
    reusable_groups,
    write_group,
)
from tests.ray_procs import REPO, clean_env, kill_run, short_tmpdir
from tests.stages.test_trajectories import _cfg, _copy_inputs, _publish_ref


def _group_files(folder: Path) -> dict[str, bytes]:
    return {f.name: f.read_bytes() for f in sorted(folder.glob("group-*.parquet"))}


def _kill_after_groups(cfg_file: Path, tmp: Path, log: Path, n: int) -> int:
    """Run `s2l trajectories` in its own process group and Ray; SIGKILL it all as soon as n
    group files are published. Returns the number of group files at the kill."""
    marker = short_tmpdir("s2l_tr_")
    with log.open("wb") as f:
        proc = subprocess.Popen([sys.executable, "-m", "s2l_ray", "trajectories", str(cfg_file)],
                                cwd=REPO, env=clean_env(RAY_TMPDIR=str(marker)),
                                start_new_session=True, stdout=f, stderr=subprocess.STDOUT)
        try:
            deadline = time.time() + 300
            while proc.poll() is None and time.time() < deadline:
                if tmp.is_dir() and len(list(tmp.glob("group-*.parquet"))) >= n:
                    break
                time.sleep(0.005)
        finally:
            kill_run(proc, str(marker))
            shutil.rmtree(marker, ignore_errors=True)
    return len(list(tmp.glob("group-*.parquet")))


@pytest.mark.ray
@pytest.mark.slow
def test_killed_run_resumes_with_missing_groups_only(tmp_path: Path, ray_local, tiny_ref: str,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    # Slow scoring (small batches, 1 actor): a wide window between the first
    # group file and the last, for the kill to land in.
    extra = ("demo.n_train=400", "trajectories.batch_tokens=128", "trajectories.concurrency=1")
    clean = tmp_path / "clean"
    cfg = _cfg(clean, tiny_ref, *extra, "run.progress_seconds=0.2")  # short: lines must show
    caplog.set_level(logging.INFO, logger="s2l_ray")
    ingest = run_stage(cfg, "ingest").report()
    assert ingest["rows_per_s"] > 0 and ingest["tokens_per_s"] > 0
    assert re.search(r"ingest: [\d,]+ rows", caplog.text)
    _publish_ref(cfg, tiny_ref)
    expected = _group_files(run_stage(cfg, "trajectories").path)
    # progress lines while scoring (a stage longer than the cadence): done/total (%), and the
    # final one with the rate and ETA
    lines = re.findall(r"trajectories: [\d,]+/([\d,]+) examples \(\d+%\)(.*)", caplog.text)
    assert len(lines) >= 2, caplog.text[-3000:]
    assert {int(t.replace(",", "")) for t, _ in lines} == {ingest["valid"]}
    assert re.fullmatch(r", [\d,.]+ ex/s, ETA 0s", lines[-1][1])
    full = json.loads((clean / "trajectories" / "report.json").read_text())
    groups = full["groups"]
    assert len(expected) == groups > 2 and full["groups_reused"] == 0
    assert full["groups_scored"] == groups and full["examples_scored"] == full["examples"]

    out = tmp_path / "resumed"
    _copy_inputs(clean, out)
    cfg2 = _cfg(out, tiny_ref, *extra, "run.num_cpus=2")
    dump_config(cfg2, tmp_path / "cfg.yaml")
    tmp = out / ".trajectories.tmp"
    at_kill = _kill_after_groups(tmp_path / "cfg.yaml", tmp, tmp_path / "killed.log", n=2)
    tail = (tmp_path / "killed.log").read_text(errors="replace")[-3000:]
    assert not (out / "trajectories").exists(), tail
    assert 2 <= at_kill < groups, (at_kill, groups, tail)

    # What a kill (or a damaged disk) can leave: a half-written .part, and a truncated file.
    kept = sorted(tmp.glob("group-*.parquet"))
    damaged = kept[0]
    damaged.write_bytes(damaged.read_bytes()[: damaged.stat().st_size // 2])
    (tmp / f".{kept[-1].name}.part").write_bytes(b"PAR1 half a file")

    caplog.clear()
    rep = run_stage(cfg2, "trajectories").report()
    assert rep["groups_reused"] == at_kill - 1  # all complete files but the damaged one
    assert rep["groups_scored"] == groups - rep["groups_reused"]
    assert rep["examples_reused"] + rep["examples_scored"] == rep["examples"] == full["examples"]
    assert rep["examples_scored"] < full["examples"]
    assert rep["tokens"] == full["tokens"] and rep["padded_tokens"] == full["padded_tokens"]
    assert f"scoring {damaged.name} again" in caplog.text
    assert _group_files(out / "trajectories") == expected  # bitwise, every group
    assert not list((out / "trajectories").glob(".*part"))


def _meta_file(folder: Path, group: int, groups: int, key: str = "k") -> Path:
    ids = [f"id{group}-{i}" for i in range(5)]
    table = pa.table({"id": ids, "losses": pa.FixedSizeListArray.from_arrays(
        pa.array([0.5] * (2 * len(ids)), pa.float32()), 2)})
    write_group(folder, group, groups, table, key, ScoreStats(tokens=7))
    return folder / group_file(group, groups)


def test_group_files_are_checked_before_reuse(tmp_path: Path) -> None:
    sizes = [5, 5, 5, 5]  # rows per group of the run's plan
    good = _meta_file(tmp_path, 1, 4)
    assert check_group(good, sizes, "k")["rows"] == 5
    with pytest.raises(ValueError, match="another group, group count, checkpoints or examples"):
        check_group(good, sizes, "another plan or checkpoints")
    with pytest.raises(ValueError, match="not a group file"):
        check_group(good, [5] * 8, "k")
    with pytest.raises(ValueError, match="holds 5 rows, its group has 6"):
        check_group(good, [5, 6, 5, 5], "k")
    # Rows swapped for others with the metadata left as it was.
    bad = _meta_file(tmp_path, 2, 4)
    t = pq.read_table(bad)
    pq.write_table(t.slice(1).replace_schema_metadata(t.schema.metadata), bad)
    with pytest.raises(ValueError, match="do not match its metadata"):
        check_group(bad, sizes, "k")
    cut = _meta_file(tmp_path, 3, 4)
    cut.write_bytes(cut.read_bytes()[:-20])
    with pytest.raises(ValueError, match="unreadable"):
        check_group(cut, sizes, "k")
    (tmp_path / ".group-00000-of-00004.parquet.part").write_bytes(b"x")
    (tmp_path / "part-0.parquet").write_bytes(b"x")  # e.g. another writer's file
    found = reusable_groups(tmp_path, sizes, "k")
    assert list(found) == [1]
    assert sorted(p.name for p in tmp_path.iterdir()) == [good.name]
