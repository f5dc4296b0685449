"""Reference training on a real local Ray with real DeepSpeed (CPU, gloo): checkpoints, loss,
prompt masking, resume after a killed run, and configs that fail before training starts."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from s2l_ray.config import ConfigError, dump_config, load_config
from s2l_ray.core.tokens import pad_batch
from s2l_ray.stages.registry import run_stage
from s2l_ray.stages.train_ref import load_manifest
from tests.conftest import copy_upstream, make_cfg, overrides, small_cfg

pytestmark = pytest.mark.ray
T = 3  # the small run's reference.num_checkpoints


def _overrides(tiny_ref: str, out: Path) -> list[str]:
    return overrides(out, tiny_ref, "reference.num_workers=2")  # 2 DeepSpeed ranks (gloo)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, upstream: Path, tiny_ref: str):
    """The small run's reference training (1 worker, 1 epoch), published once per session."""
    out = copy_upstream(upstream, tmp_path_factory.mktemp("train") / "out")
    cfg = small_cfg(out, tiny_ref)
    return cfg, run_stage(cfg, "train-ref")


def _hf_loss(path: str, probe: dict) -> float:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path).eval()
    ids, mask, labels = pad_batch(probe["input_ids"], probe["n_prompt_tokens"], pad_id=0)
    with torch.no_grad():
        return float(model(input_ids=ids, attention_mask=mask, labels=labels).loss)


@pytest.mark.slow  # the session's upstream run: 30-60 s on 2 CPUs, shared with later tests
def test_t_checkpoints_and_loss_goes_down(trained) -> None:
    _, stage = trained
    manifest = load_manifest(stage.path)
    assert len(manifest) == T == len(list((stage.path / "checkpoints").iterdir()))
    steps = [m["step"] for m in manifest]
    assert steps == sorted(steps) and steps[-1] == stage.report()["plan"]["total_steps"]
    assert manifest[-1]["train_loss"] < manifest[0]["train_loss"] - 0.3
    assert manifest[-1]["probe_loss"] < manifest[0]["probe_loss"]
    assert not (stage.path / "ray_train").exists()  # optimizer state dropped after success
    assert stage.report()["tokens_per_s_per_worker"] > 0


@pytest.mark.slow
def test_each_checkpoint_loads_and_reproduces_logged_loss(trained) -> None:
    _, stage = trained
    probe = json.loads((stage.path / "probe.json").read_text())
    for m in load_manifest(stage.path):
        assert (Path(m["path"]) / "model.safetensors").is_file()
        assert _hf_loss(m["path"], probe) == pytest.approx(m["probe_loss"], rel=1e-4, abs=1e-5)


@pytest.mark.slow
def test_rerun_is_skipped(trained) -> None:
    cfg, stage = trained
    marker = (stage.path / "_SUCCESS.json").read_text()
    run_stage(cfg, "train-ref")
    assert (stage.path / "_SUCCESS.json").read_text() == marker


def test_prompt_predictions_do_not_change_the_loss(tiny_ref: str) -> None:
    """Perturbing logits that predict prompt tokens leaves the loss; response ones change it."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_ref).eval()
    rows, n_prompt = [[5, 6, 7, 8, 9, 10, 11], [12, 13, 14, 15]], [4, 2]
    ids, mask, labels = pad_batch(rows, n_prompt, pad_id=0)

    def loss_with(positions: list[tuple[int, int]]) -> float:
        def hook(_m, _i, out):  # out: logits (B, L, V)
            out = out.clone()
            for b, t in positions:
                out[b, t] += torch.randn(out.shape[-1]) * 10
            return out
        h = model.get_output_embeddings().register_forward_hook(hook)
        try:
            with torch.no_grad():
                return float(model(input_ids=ids, attention_mask=mask, labels=labels).loss)
        finally:
            h.remove()

    base = loss_with([])
    # logits at t predict token t+1: t < n_prompt-1 predict prompt tokens; padding too
    prompt_and_pad = [(0, 0), (0, 1), (0, 2), (1, 0), (1, 4), (1, 5)]
    assert loss_with(prompt_and_pad) == pytest.approx(base, abs=1e-6)
    assert abs(loss_with([(0, 3)]) - base) > 1e-3  # predicts the first response token


def test_bad_configs_fail_before_training(tmp_path: Path, ray_local, tiny_ref: str) -> None:
    for override, key in [("reference.num_checkpoints=1000", "reference.num_checkpoints"),
                          ("reference.checkpoint_steps=[1, 9999]", "reference.checkpoint_steps"),
                          ("reference.cpus_per_worker=1", "reference.cpus_per_worker"),
                          ("reference.batch_size=1000", "reference.batch_size")]:
        cfg = make_cfg(tmp_path, tiny_ref, "demo.n_train=100", "demo.n_test_per_source=1",
                       "reference.num_workers=2", "reference.cpus_per_worker=0.5",
                       "reference.num_checkpoints=2", override)
        with pytest.raises(ConfigError, match=key):
            run_stage(cfg, "train-ref")
        assert not (tmp_path / "out" / ".train_ref.tmp").exists()
    for override, key in [("reference.num_workers=0", "reference.num_workers"),
                          ("reference.zero_stage=5", "reference.zero_stage")]:
        with pytest.raises(ConfigError, match=key):
            make_cfg(tmp_path, tiny_ref, override)


@pytest.mark.slow
def test_killed_run_resumes_then_survives_a_worker_death(tmp_path: Path, upstream: Path,
                                                          tiny_ref: str) -> None:
    """Kill a 2-worker training run (driver and its Ray) after its 2nd checkpoint; the rerun
    does only the rest, and survives one of its Ray Train workers SIGKILLed after its first
    checkpoint: with max_failures=1 Ray Train restarts the worker group, which resumes from that
    checkpoint, not from step 0. (One training for both: each is a worker-group start.)"""
    import ray
    from ray._private import state

    out = copy_upstream(upstream, tmp_path / "out", ("ingest",))  # the small run's data
    # 56 steps after the killed run's 2nd checkpoint, and after the rerun's first, for each
    # kill to land in. A step takes ~0.05 s here since the worker stopped reporting every log
    # line, and Ray Train registers a checkpoint a poll (0.2 s in tests) after it is reported;
    # 12 steps were too few once (the killed run had passed its 3rd checkpoint when the kill
    # landed). 73 steps per epoch at batch 2: two epochs.
    overrides = [*_overrides(tiny_ref, out), "reference.batch_size=2", "reference.epochs=2",
                 "reference.max_failures=1", "reference.max_steps=120",
                 "reference.checkpoint_steps=[2, 4, 60, 116, 120]"]
    cfg = load_config(None, overrides)
    cfg_file = tmp_path / "cfg.yaml"
    dump_config(cfg, cfg_file)
    env = {**os.environ, "RAY_ADDRESS": ""}
    log_file = (tmp_path / "killed_run.log").open("wb")
    proc = subprocess.Popen([sys.executable, "-m", "s2l_ray", "train-ref", str(cfg_file)],
                            env=env, start_new_session=True, stdout=log_file,
                            stderr=subprocess.STDOUT)
    # A checkpoint counts once Ray Train's snapshot lists it (its folder appears earlier).
    snapshot = out / ".train_ref.tmp" / "ray_train" / "checkpoint_manager_snapshot.json"

    def registered(step: int) -> bool:
        return snapshot.exists() and f"step_{step:07d}" in snapshot.read_text()

    try:
        deadline = time.time() + 240
        while not registered(4) and time.time() < deadline and proc.poll() is None:
            time.sleep(0.02)
        assert registered(4), (tmp_path / "killed_run.log").read_text()[-3000:]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        log_file.close()
    assert not (out / "train_ref").exists()
    killed_at = time.time()

    killed: list[int] = []

    def kill_a_worker() -> None:  # once the rerun has registered its first checkpoint
        deadline = time.time() + 300
        while time.time() < deadline:
            if registered(60):
                workers = [a["Pid"] for a in state.actors(actor_state_name="ALIVE").values()
                           if a["ActorClassName"] == "RayTrainWorker"
                           and a["JobID"] == ray.get_runtime_context().get_job_id()]
                if workers:
                    os.kill(workers[0], signal.SIGKILL)
                    killed.append(workers[0])
                    return
            time.sleep(0.05)

    killer = threading.Thread(target=kill_a_worker, daemon=True)
    killer.start()
    stage = run_stage(cfg, "train-ref")
    killer.join(timeout=5)
    assert killed, "no Ray Train worker was found to kill"
    manifest = load_manifest(stage.path)
    assert [m["step"] for m in manifest] == [2, 4, 60, 116, 120]
    assert [m["attempt_start_step"] for m in manifest[:2]] == [0, 0]  # from the killed run
    assert manifest[2]["attempt_start_step"] == 4  # resumed, not redone
    # The last checkpoint came from the restarted group, resumed from a checkpoint (60, or 116
    # if training got there before the kill landed), not from step 0.
    assert manifest[-1]["attempt_start_step"] in (60, 116)
    first = Path(manifest[0]["path"]) / "model.safetensors"
    assert first.stat().st_mtime < killed_at
