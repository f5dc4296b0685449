"""Stage `train-ref`: fine-tune the small reference model on ALL the data, keep T checkpoints.

`training.driver.fit`: Ray Train's TorchTrainer runs `training.worker.train_loop_per_worker`
(DeepSpeed) on `num_workers`
workers, fed from the ingest Parquet through `get_dataset_shard`. Checkpoints go to Ray Train's
storage inside the stage's work folder; a run that is stopped resumes from the latest one when
started again with the same config (Ray Train restores a run by its storage path and name). When
training ends, the T Hugging Face checkpoints are laid out as

    train_ref/checkpoints/step_0000040/   (from_pretrained-loadable: safetensors+config+tokenizer)
    train_ref/manifest.json               [{index, step, epoch, train_loss, probe_loss, path}]
    train_ref/probe.json                  the fixed batch `probe_loss` is measured on
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

from s2l_ray.config import S2LConfig
from s2l_ray.io.atomic import copy_tree_atomic
from s2l_ray.stages.base import read_report, trash_of
from s2l_ray.training.driver import fit, plan_training, probe_batch

log = logging.getLogger(__name__)
def check(cfg: S2LConfig, inputs: dict[str, Path]) -> None:
    """The step plan and the CPU headroom, before the work folder is made."""
    plan_training(cfg.reference, "reference", read_report(inputs["ingest"])["valid"])


def run(cfg: S2LConfig, inputs: dict[str, Path], tmp: Path) -> dict[str, Any]:
    """Train the reference model on the ingest examples; checkpoints + manifest into `tmp`.
    `tmp` is kept across an interruption: Ray Train's checkpoints in it resume the run."""
    examples = inputs["ingest"] / "examples"
    rep = read_report(inputs["ingest"])
    plan = plan_training(cfg.reference, "reference", rep["valid"])
    ckpts = fit(cfg, cfg.reference, "reference", examples, plan, tmp, rep["tokenizer"])
    (tmp / "checkpoints").mkdir(exist_ok=True)
    manifest = []
    for c in ckpts:
        rel = f"checkpoints/step_{c['step']:07d}"
        if not (tmp / rel).exists():  # copied whole or not at all: a rerun trusts what exists
            copy_tree_atomic(Path(c["dir"]) / "hf", tmp / rel)
        manifest.append({k: c[k] for k in ("index", "step", "epoch", "train_loss", "probe_loss",
                                           "lr", "attempt_start_step")} | {"path": rel})
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    (tmp / "probe.json").write_text(json.dumps(probe_batch(examples)))
    speed = [c.get("tokens_per_s_per_worker", 0.0) for c in ckpts]
    # Optimizer states are only needed while training can resume: moved aside in one rename (a
    # kill mid-delete must not leave a half state to resume from), deleted once published, and
    # never uploaded to run.storage_uri.
    trash = trash_of(tmp)
    shutil.rmtree(trash, ignore_errors=True)
    os.replace(tmp / "ray_train", trash)
    log.info("train-ref: %d checkpoints, train loss %.4f -> %.4f", len(manifest),
             manifest[0]["train_loss"], manifest[-1]["train_loss"])
    return {"model": cfg.reference.model, "plan": plan.as_dict(), "checkpoints": manifest,
            "tokens_per_s_per_worker": max(speed)}


def load_manifest(stage_path: Path) -> list[dict[str, Any]]:
    """The checkpoints in order, with absolute paths (what the trajectory stage reads)."""
    manifest = json.loads((stage_path / "manifest.json").read_text())
    return [{**m, "path": str(stage_path / m["path"])} for m in manifest]
