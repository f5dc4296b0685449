"""The training driver, shared by the reference (stage train-ref) and the target (each sweep
trial): the step plan and its checks (`plan_training`), the fixed probe batch, and `fit`, which
runs Ray Train's TorchTrainer with `training.worker.train_loop_per_worker` (DeepSpeed) on every
worker and returns the checkpoints in step order.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from s2l_ray.config import S2LConfig, TrainConfig
from s2l_ray.errors import config_keys

log = logging.getLogger(__name__)
PROBE_SIZE = 8  # examples in the fixed batch each checkpoint's loss is logged on


def probe_batch(examples: Path, k: int = PROBE_SIZE) -> dict[str, list]:
    """The k examples with the smallest ids: a fixed batch, whatever the file layout."""
    import pyarrow.compute as pc
    import pyarrow.dataset as pads

    data = pads.dataset(str(examples), format="parquet")
    ids = sorted(data.to_table(columns=["id"])["id"].to_pylist())[:k]
    rows = data.to_table(columns=["id", "input_ids", "n_prompt_tokens"],
                         filter=pc.field("id").isin(ids)).sort_by("id").to_pylist()
    return {c: [r[c] for r in rows] for c in ("id", "input_ids", "n_prompt_tokens")}


def plan_training(section: TrainConfig, key: str, n_examples: int) -> Any:
    """The step plan, and every check that can fail, before any training work starts."""
    from s2l_ray.core.schedule import make_plan
    from s2l_ray.runtime import check_cpu_headroom

    s = section
    with config_keys(key):
        plan = make_plan(n_examples, s.num_workers, s.batch_size, s.grad_accum, s.epochs,
                         s.max_steps, s.num_checkpoints, s.checkpoint_steps, s.train_steps)
    check_cpu_headroom(s.num_workers, s.cpus_per_worker, f"{key}.cpus_per_worker",
                       f"{key}.num_workers", "training workers")
    return plan


def fit(cfg: S2LConfig, section: TrainConfig, key: str, examples: Path, plan: Any,
        work: Path, tokenizer_path: str, *, seed: int | None = None,
        callbacks: list[Any] | None = None, log_lines: int = 20) -> list[dict[str, Any]]:
    """Run (or resume) Ray Train + DeepSpeed on `examples` following `plan`.

    Used for the reference model and, inside Tune trials, for the target (`seed` replaces
    run.seed; `callbacks` are Ray Train callbacks, e.g. Tune's report callback).
    Checkpoints are dicts {index, step, epoch, train_loss, probe_loss, ..., dir} in step order,
    `dir` being the Ray checkpoint folder holding `hf/`.
    """
    import ray.data
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from s2l_ray.models.specs import resolve_model
    from s2l_ray.runtime import cluster_has_gpus
    from s2l_ray.training.worker import train_loop_per_worker

    s = section
    use_gpu = cluster_has_gpus() if s.use_gpu is None else s.use_gpu
    resources = {"CPU": s.cpus_per_worker, **({"GPU": 1} if use_gpu else {})}
    log.info("%s: %d examples, %d workers (%s), %d steps (%d/epoch), checkpoints at %s",
             key, plan.n_examples, s.num_workers, "GPU" if use_gpu else "CPU", plan.total_steps,
             plan.steps_per_epoch, list(plan.checkpoint_steps))
    ds = ray.data.read_parquet(str(examples)).select_columns(["input_ids", "n_prompt_tokens"])
    seed = cfg.run.seed if seed is None else seed
    ds = ds.randomize_block_order(seed=seed)
    loop_cfg = {
        "plan": plan.as_dict(), "model_path": resolve_model(s.model, cfg),
        "tokenizer_path": tokenizer_path, "trust_remote_code": s.trust_remote_code,
        "lr": s.lr, "warmup_ratio": s.warmup_ratio, "weight_decay": s.weight_decay,
        "zero_stage": s.zero_stage, "precision": s.precision, "use_gpu": use_gpu,
        "seed": seed, "shuffle_buffer": 4 * s.batch_size * s.grad_accum,
        "probe": probe_batch(examples), "log_lines": log_lines,
    }
    trainer = TorchTrainer(
        train_loop_per_worker, train_loop_config=loop_cfg, datasets={"train": ds},
        scaling_config=ScalingConfig(num_workers=s.num_workers, use_gpu=use_gpu,
                                     resources_per_worker=resources),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        run_config=RunConfig(name="ray_train", storage_path=str(work.resolve()),
                             checkpoint_config=CheckpointConfig(num_to_keep=None),
                             failure_config=FailureConfig(max_failures=s.max_failures),
                             callbacks=callbacks),
    )
    result = trainer.fit()
    if result.error:
        raise result.error
    found = sorted((work / "ray_train").glob("step_*/state.json"))
    if not found:
        raise RuntimeError(f"{key}: training ended without a checkpoint in {work}")
    history = json.loads(found[-1].read_text())["history"]
    dirs = {int(p.parent.name.split("_")[1]): p.parent for p in found}
    ckpts = [{**h, "dir": str(dirs[h["step"]])} for h in history]
    if [c["step"] for c in ckpts] != list(plan.checkpoint_steps):
        raise RuntimeError(f"{key}: expected checkpoints at {list(plan.checkpoint_steps)}, "
                           f"found {[c['step'] for c in ckpts]}")
    return ckpts


