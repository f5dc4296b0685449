"""Failures mid-stage on real Ray: a worker node lost while trajectories are computed (a
multi-node `ray.cluster_utils.Cluster`, in a process of its own). A Ray Train worker killed
during reference training (reference.max_failures=1) is
tests/stages/test_train_ref.py::test_killed_run_resumes_then_survives_a_worker_death.

For the node loss the reference checkpoints are built directly (seeded perturbations of the tiny
model, published as a train_ref stage, as tests/stages/test_trajectories.py does): the trajectory
stage only needs T loadable checkpoints, and training them would double the test's time."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from s2l_ray.config import dump_config, load_config
from s2l_ray.stages.registry import run_stage, stage_for
from s2l_ray.stages.train_ref import load_manifest
from tests.conftest import overrides
from tests.ray_procs import REPO, clean_env, kill_run, short_tmpdir

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def _overrides(tiny_ref: str, out: Path) -> list[str]:
    return overrides(out, tiny_ref, "demo.n_train=200", "reference.num_workers=2",
                     "trajectories.cpus_per_actor=1",
                     # small batches: 16 groups of several batches each, so scoring takes a while
                     "trajectories.batch_tokens=512")


def _publish_checkpoints(cfg, tiny_ref: str, t: int = 3) -> None:
    """A published train_ref stage of t checkpoints: the tiny model plus seeded noise."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    stage = stage_for(cfg, "train-ref")
    tmp, manifest = stage.begin(), []
    for i in range(t):
        model = AutoModelForCausalLM.from_pretrained(tiny_ref)
        gen = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.05 * i * torch.randn(p.shape, generator=gen))
        rel = f"checkpoints/step_{i + 1:07d}"
        model.save_pretrained(str(tmp / rel))
        AutoTokenizer.from_pretrained(tiny_ref).save_pretrained(str(tmp / rel))
        manifest.append({"index": i, "step": i + 1, "epoch": 0, "train_loss": 1.0,
                         "probe_loss": 1.0, "lr": 1e-3, "attempt_start_step": 0, "path": rel})
    (tmp / "manifest.json").write_text(json.dumps(manifest))
    stage.publish({"checkpoints": manifest})


def _losses(folder: Path) -> tuple[list[str], np.ndarray]:
    files = sorted(folder.glob("*.parquet"))  # not manifest.json
    table = pq.read_table(files, columns=["id", "losses"]).sort_by("id")
    return table["id"].to_pylist(), np.array(table["losses"].to_pylist())


def _undisturbed(cfg) -> tuple[list[str], np.ndarray]:
    """The stage's result computed in this process without Ray: every group scored whole, as
    one actor call would. The stage's output does not depend on actors or blocks (groups are
    ranges of ingest's rows in order), so an undisturbed run of the stage gives exactly this."""
    from s2l_ray.core.losses import score_block
    from s2l_ray.io.parquet import parquet_files
    from s2l_ray.stages.trajectories import INPUT_COLUMNS, load_checkpoint, n_groups, with_groups

    ingest = stage_for(cfg, "ingest")
    rep, batch_tokens = ingest.report(), cfg.trajectories.batch_tokens
    table = pq.read_table(parquet_files(ingest.path / "examples", "ingest"), columns=INPUT_COLUMNS)
    table = with_groups(table, n_groups(rep["valid"], rep["tokens"], batch_tokens))
    models = [load_checkpoint(m["path"]) for m in load_manifest(stage_for(cfg, "train-ref").path)]
    out, _ = score_block(models, table, batch_tokens, torch.device("cpu"))
    out = out.sort_by("id")
    return out["id"].to_pylist(), np.array(out["losses"].to_pylist())


@pytest.mark.e2e
def test_trajectories_survive_losing_a_worker_node(tmp_path: Path, ray_local,
                                                   tiny_ref: str) -> None:
    # Inputs: ingest on the session's Ray, checkpoints built directly; the expected losses.
    out = tmp_path / "out"
    cfg = load_config(None, [*_overrides(tiny_ref, out), "trajectories.concurrency=2"])
    run_stage(cfg, "ingest")
    _publish_checkpoints(cfg, tiny_ref, t=5)  # more work per block: a wider window to kill in
    ids, losses = _undisturbed(cfg)
    assert len(ids) == len(set(ids)) == run_stage(cfg, "ingest").report()["valid"]

    # The stage on a head and two worker nodes, a node running a scorer actor killed mid-stage.
    dump_config(cfg, tmp_path / "cfg.yaml")
    marker = str(short_tmpdir("s2l_ft_"))
    result, log_path = tmp_path / "result.json", tmp_path / "cluster.log"
    with log_path.open("wb") as log_file:
        proc = subprocess.Popen(
            [sys.executable, str(REPO / "tests" / "fault_tolerance_run.py"),
             str(tmp_path / "cfg.yaml"), str(result)], cwd=REPO, start_new_session=True,
            env=clean_env(RAY_TMPDIR=marker), stdout=log_file, stderr=subprocess.STDOUT)
        try:
            proc.wait(timeout=600)
        except subprocess.TimeoutExpired:
            pass
        finally:
            kill_run(proc, marker)
            shutil.rmtree(marker, ignore_errors=True)
    tail = log_path.read_text(errors="replace")[-6000:]
    assert result.is_file(), tail
    info = json.loads(result.read_text())
    assert "error" not in info, f"{info['error']}\n{tail}"
    assert info["killed"] and not info["marker_at_kill"], tail
    assert info["scorers_on_victim"] >= 1
    assert info["rows_at_kill"] < len(ids)  # killed mid-stage, with examples left to score
    got_ids, got = _losses(out / "trajectories")
    assert got_ids == ids  # every example exactly once (sorted, and no duplicates)
    np.testing.assert_allclose(got, losses, rtol=0, atol=1e-5)
    assert info["report"]["examples"] == len(ids)
