"""Kill-and-resume across the whole pipeline: a run is SIGKILLed inside each stage in turn (each
run a fresh process with its own local Ray, killed with it), and the final uninterrupted run (a
new driver: this process, on the session's Ray) ends with the same selected ids as a clean run,
without redoing any stage that had finished before a kill.

The runs use the small run's sizes (tests/conftest.py SMALL_RUN), so the clean run is the
session's published `upstream` (ingest, train-ref, trajectories: computed once per test session
and shared with other tests) plus its own cluster and select. Training and scoring are
deterministic, so a chain that recomputes every stage in its own Rays must match it bitwise.

The stages come from `s2l_ray.stages.registry.STAGES`, so a stage added there is covered without
editing this test; `sweep` is left out (it fine-tunes target models under Ray Tune: minutes per
run on CPU; tests/stages/test_sweep.py covers its own resume), so the runs stop at the stage
before it.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from s2l_ray.config import dump_config, load_config
from s2l_ray.stages.registry import BY_NAME, STAGES, run_stage
from tests.conftest import UPSTREAM, copy_upstream, overrides
from tests.ray_procs import REPO, clean_env, kill_run, short_tmpdir

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
LEFT_OUT = {"sweep"}
NAMES = [s.name for s in STAGES if s.name not in LEFT_OUT]
MARKER = "_SUCCESS.json"


def _dir(stage: str) -> str:
    return BY_NAME[stage].folder  # CLI name -> folder name (train-ref -> train_ref)


def _overrides(tiny_ref: str, out: Path) -> list[str]:
    # data, reference and trajectories exactly as the session's `upstream` (the clean run)
    return overrides(out, tiny_ref, "run.num_cpus=2", "cluster.k=5", "cluster.max_iter=10",
                     "select.budget=0.2")


def _selected(out: Path) -> list[str]:
    return pq.read_table(out / "select" / "selected.parquet", columns=["id"])["id"].to_pylist()


def _finished(out: Path) -> dict[str, tuple[str, int]]:
    """Published stages: marker text (fingerprint, finished_at) and its mtime."""
    found = {}
    for s in NAMES:
        f = out / _dir(s) / MARKER
        if f.is_file():
            found[s] = (f.read_text(), f.stat().st_mtime_ns)
    return found


def _started(out: Path, stage: str) -> bool:
    """The stage began (its work folder exists) at least 0.1 s ago: into its work, and far from
    its publish (every stage takes longer than that). Not "once it has written something":
    cluster and select write only just before they publish."""
    try:
        return time.time() - (out / f".{_dir(stage)}.tmp").stat().st_mtime >= 0.1
    except FileNotFoundError:
        return False


def _run(cfg_file: Path, log: Path, stop_in: str) -> subprocess.CompletedProcess | None:
    """Run the pipeline up to its last stage in a new process group with its own Ray; SIGKILL
    the group, and its Ray, once stage `stop_in` has started: None, or how the run ended if it
    ended before that."""
    out = Path(load_config(cfg_file, []).run.output_dir)
    ray_tmp = short_tmpdir("s2l_rs_")
    with log.open("wb") as f:
        proc = subprocess.Popen([sys.executable, "-m", "s2l_ray", NAMES[-1], str(cfg_file)],
                                cwd=REPO, env=clean_env(RAY_TMPDIR=str(ray_tmp)),
                                start_new_session=True, stdout=f, stderr=subprocess.STDOUT)
        try:
            deadline = time.time() + 600
            while proc.poll() is None and time.time() < deadline:
                if _started(out, stop_in):
                    return None  # killed in `finally`
                time.sleep(0.02)
            try:
                proc.wait(timeout=max(1.0, deadline - time.time()))
            except subprocess.TimeoutExpired:
                return subprocess.CompletedProcess(proc.args, -1)  # timed out; caller shows log
            return subprocess.CompletedProcess(proc.args, proc.returncode)
        finally:
            kill_run(proc, str(ray_tmp))
            shutil.rmtree(ray_tmp, ignore_errors=True)


def test_killed_in_every_stage_then_resumed(tmp_path: Path, upstream: Path,
                                            tiny_ref: str) -> None:
    assert NAMES[:2] == ["ingest", "train-ref"] and len(NAMES) >= 5, NAMES
    # The clean run, on the session's Ray: the shared upstream stages, then the rest here.
    clean = copy_upstream(upstream, tmp_path / "clean")
    copied = _finished(clean)
    assert [_dir(s) for s in copied] == list(UPSTREAM)
    run_stage(load_config(None, _overrides(tiny_ref, clean)), NAMES[-1])
    done = _finished(clean)
    assert all(done[s] == v for s, v in copied.items())  # the same config: reused as they are
    expected = _selected(clean)
    assert expected

    out = tmp_path / "chain"
    cfg_file = tmp_path / "chain.yaml"
    dump_config(load_config(None, _overrides(tiny_ref, out)), cfg_file)
    first_seen: dict[str, tuple[str, int]] = {}
    for i, stage in enumerate(NAMES):
        log = tmp_path / f"run{i}_{stage}.log"
        got = _run(cfg_file, log, stop_in=stage)
        tail = log.read_text(errors="replace")[-4000:]
        assert got is None, f"run {i} ended (exit {got and got.returncode}) before {stage}:" \
                            f"\n{tail}"
        done = _finished(out)
        # The ones before, in order; not this one (it was killed before publishing).
        assert list(done) == NAMES[:i], (stage, list(done), tail)
        for s, seen in first_seen.items():
            assert done[s] == seen, f"{s} was redone in run {i}"  # marker and mtime unchanged
        first_seen.update({s: v for s, v in done.items() if s not in first_seen})

    # The final run, uninterrupted: a new driver (this process) on the session's Ray.
    run_stage(load_config(cfg_file, []), NAMES[-1])
    done = _finished(out)
    assert list(done) == NAMES
    for s, seen in first_seen.items():
        assert done[s] == seen, f"{s} was redone by the final run"
    assert _selected(out) == expected
    leftovers = sorted(p.name for p in out.iterdir() if p.name.startswith("."))
    assert leftovers == [], leftovers  # no .tmp/.old/.download left behind
