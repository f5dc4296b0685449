"""The per-worker loop Ray Train runs: DeepSpeed causal-LM fine-tuning with T checkpoints.

Shared by the reference model (stage train-ref) and the target model: one loop, not two.
Each checkpoint Ray Train stores holds
    hf/          the model in Hugging Face format (safetensors + config + tokenizer), rank 0
    ds/          DeepSpeed's full training state (optimizer, scheduler, RNG), every rank
    state.json   step, epoch, losses
so a stopped run resumes from the latest one (`ray.train.get_checkpoint()`), and any later stage
or a user loads `hf/` with `from_pretrained`.
"""

from __future__ import annotations

import json
import logging
import math
import tempfile
import time
from pathlib import Path
from typing import Any

log = logging.getLogger("s2l_ray.train")


def deepspeed_config(zero_stage: int, batch_size: int, grad_accum: int, world: int, lr: float,
                     weight_decay: float, precision: str, on_gpu: bool) -> dict[str, Any]:
    """DeepSpeed's config for this run. On CPU (gloo) reduce-scatter is off: gloo lacks it."""
    return {
        "train_micro_batch_size_per_gpu": batch_size,
        "gradient_accumulation_steps": grad_accum,
        "train_batch_size": batch_size * grad_accum * world,
        "optimizer": {"type": "AdamW", "params": {
            "lr": lr, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": weight_decay,
            "torch_adam": True}},  # torch's AdamW: no compiled ops needed on CPU workers
        "zero_optimization": {"stage": zero_stage, "reduce_scatter": on_gpu,
                              "overlap_comm": on_gpu, "contiguous_gradients": True},
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16"},
        "gradient_clipping": 1.0,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def skip_cpu_comm_ops() -> None:
    """Keep DeepSpeed from JIT-compiling its CPU communication ops (shm, oneCCL) on CPU workers.

    DeepSpeed's torch backend builds the `deepspeed_shm_comm` C++ op the first time a CPU process
    initialises it: minutes of a silent compiler run on a laptop, for an all-reduce that gloo
    does as well at tiny-model sizes. Marking the ops incompatible in DeepSpeed's own
    compatibility table (`deepspeed.ops.__compatible_ops__`, kept once probed, which its comm
    backend consults before building) makes it fall back to torch.distributed (gloo).
    """
    import deepspeed.ops

    compatible = deepspeed.ops.__compatible_ops__
    for name in ("deepspeed_shm_comm", "deepspeed_ccl_comm"):
        if compatible.get(name):
            compatible[name] = False


def resolve_precision(precision: str, on_gpu: bool) -> str:
    if precision != "auto":
        return precision
    if not on_gpu:
        return "fp32"
    import torch

    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


def train_micro_step(engine: Any, ids: Any, mask: Any, labels: Any, device: Any) -> Any:
    """One DeepSpeed micro-step (forward, backward, step); returns the loss as a detached device
    tensor: no host synchronisation here, the caller reads losses only when it reports."""
    out = engine(input_ids=ids.to(device, non_blocking=True),
                 attention_mask=mask.to(device, non_blocking=True),
                 labels=labels.to(device, non_blocking=True))
    engine.backward(out.loss)
    engine.step()
    return out.loss.detach()


def probe_loss(model: Any, probe: dict[str, list], device: Any) -> float:
    """Mean response-token loss on a fixed batch (all ranks call it: ZeRO-3 gathers params)."""
    import torch

    from s2l_ray.core.tokens import pad_batch

    ids, mask, labels = pad_batch(probe["input_ids"], probe["n_prompt_tokens"], pad_id=0)
    was_training = model.training
    model.eval()
    with torch.no_grad():
        out = model(input_ids=ids.to(device), attention_mask=mask.to(device),
                    labels=labels.to(device))
    model.train(was_training)
    return float(out.loss.float().item())


def _save_hf(engine: Any, out: Path, tokenizer_path: str, zero_stage: int, rank: int) -> None:
    import deepspeed
    from transformers import AutoTokenizer

    params = list(engine.module.parameters())
    if zero_stage == 3:  # parameters are partitioned: gather them (collective) to save
        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            if rank == 0:
                engine.module.save_pretrained(str(out))
    elif rank == 0:
        engine.module.save_pretrained(str(out))
    if rank == 0:
        AutoTokenizer.from_pretrained(tokenizer_path).save_pretrained(str(out))


CACHE_MAX_ROWS = 100_000  # a shard this small is kept in the worker's memory after one pass
FETCH_BATCHES = 32  # micro-batches fetched from Ray Data per call


class ShardCache:
    """Micro-batches of this worker's shard, epoch after epoch.

    The first pass streams the shard from Ray Data, fetching FETCH_BATCHES micro-batches per
    call (each call has a fixed cost that dwarfs a tiny model's step). A shard of at most
    CACHE_MAX_ROWS rows is kept in memory after that pass, and later epochs shuffle it locally
    with their own seed instead of re-running the Ray Data pipeline (seconds per epoch). Every
    worker takes the same branch (a shard's size decides, and ranks' shards differ by at most
    one row), so the workers of a streaming split stay in step.
    """

    def __init__(self) -> None:
        self.rows: dict[str, Any] | None = None

    def epoch(self, shard: Any, b: int, shuffle_buffer: int, seed: int) -> Any:
        import numpy as np

        if self.rows is not None:
            n = len(self.rows["n_prompt_tokens"])
            order = np.random.default_rng(seed).permutation(n)
            for s in range(0, n, b):
                yield {k: v[order[s:s + b]] for k, v in self.rows.items()}
            return
        kept: list[dict[str, Any]] = []
        n_rows = 0
        for big in shard.iter_batches(batch_size=b * FETCH_BATCHES, batch_format="numpy",
                                      local_shuffle_buffer_size=max(shuffle_buffer,
                                                                    b * FETCH_BATCHES),
                                      local_shuffle_seed=seed):
            n = len(big["n_prompt_tokens"])
            n_rows += n
            if n_rows <= CACHE_MAX_ROWS:
                kept.append(big)
            for s in range(0, n, b):
                yield {k: v[s:s + b] for k, v in big.items()}
        if n_rows <= CACHE_MAX_ROWS and kept:
            try:
                self.rows = {k: np.concatenate([c[k] for c in kept]) for k in kept[0]}
            except ValueError:  # chunks of unequal shape (not ragged objects): keep streaming
                self.rows = None


def train_loop_per_worker(config: dict[str, Any]) -> None:
    import deepspeed
    import ray.train
    import torch
    from transformers.utils import logging as hf_logging

    from s2l_ray.core.schedule import TrainPlan, lr_at
    from s2l_ray.core.tokens import pad_batch
    from s2l_ray.models.loading import load_causal_lm

    hf_logging.disable_progress_bar()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    plan = TrainPlan(**{**config["plan"], "checkpoint_steps": tuple(
        config["plan"]["checkpoint_steps"])})
    on_gpu = torch.cuda.is_available() and config["use_gpu"]
    device = torch.device(f"cuda:{torch.cuda.current_device()}" if on_gpu else "cpu")
    precision = resolve_precision(config["precision"], on_gpu)
    torch.manual_seed(config["seed"])
    if not on_gpu:
        skip_cpu_comm_ops()

    model = load_causal_lm(config["model_path"], trust_remote_code=config["trust_remote_code"],
                           fix="check the model key (reference.model or target.model): a "
                               "folder with config.json and *.safetensors weights, or a hub id"
                           )  # in eval mode, as from_pretrained leaves it (dropout off)
    peak, total = config["lr"], plan.total_steps
    ds_cfg = deepspeed_config(config["zero_stage"], plan.batch_size, plan.grad_accum, world,
                              peak, config["weight_decay"], precision, on_gpu)
    engine, _, _, scheduler = deepspeed.initialize(
        model=model, model_parameters=[p for p in model.parameters() if p.requires_grad],
        config=ds_cfg, lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: lr_at(s, total, peak, config["warmup_ratio"]) / peak))

    step, history = 0, []
    ckpt = ray.train.get_checkpoint()
    if ckpt:  # resume: DeepSpeed restores weights, optimizer, scheduler; we restore the count
        with ckpt.as_directory() as d:
            engine.load_checkpoint(str(Path(d) / "ds"), tag="state")
            state = json.loads((Path(d) / "state.json").read_text())
        step, history = state["step"], state["history"]
        if rank == 0:
            log.info("resuming from step %d/%d", step, total)
    start_step = step

    shard = ray.train.get_dataset_shard("train")
    g, b = plan.grad_accum, plan.batch_size
    todo = plan.steps_per_epoch * g  # micro-batches trained per epoch
    # sum of micro-batch losses since the last report, on the device (no per-step sync)
    loss_acc, n_acc = torch.zeros((), dtype=torch.float32, device=device), 0
    tokens, t0 = 0, time.time()
    sink, name = config.get("progress") or (None, "")
    pushed = 0.0
    log_every = max(1, total // config["log_lines"])
    cache = ShardCache()
    for epoch in range(plan.epoch_of(step + 1) if step < total else plan.epochs, plan.epochs):
        done_in_epoch = (step - epoch * plan.steps_per_epoch) * g  # > 0 only when resuming
        batches = cache.epoch(shard, b, config["shuffle_buffer"], config["seed"] * 1009 + epoch)
        for i, batch in enumerate(batches):
            # Read the whole shard every epoch (Ray's split expects it), train on `todo` only.
            if i < done_in_epoch or i >= todo or step >= total:
                continue
            ids, mask, labels = pad_batch([list(x) for x in batch["input_ids"]],
                                          [int(n) for n in batch["n_prompt_tokens"]], pad_id=0)
            loss_acc += train_micro_step(engine, ids, mask, labels, device).float()
            n_acc += 1
            tokens += int(mask.sum())
            if (i + 1) % g:
                continue
            step += 1
            is_ckpt = step in plan.checkpoint_steps
            now = time.time()
            if rank == 0 and sink is not None and (now - pushed >= 1.0 or step == total):
                sink.set.remote(name, step)  # fire and forget: the driver polls the count
                pushed = now
            # Every rank must take the same branch (all_reduce + report are collective), so the
            # decision depends on the step count only, never on each worker's clock.
            if not is_ckpt and step % log_every and step < total:
                continue
            # mean over workers for the logged loss; on the device, as NCCL wants
            loss_sum = torch.stack([loss_acc.double(), torch.tensor(
                float(n_acc), dtype=torch.float64, device=device)])
            torch.distributed.all_reduce(loss_sum)
            loss_sum = loss_sum.cpu()
            metrics = {"step": step, "epoch": epoch + (i + 1) / max(1, todo),
                       "train_loss": float(loss_sum[0] / loss_sum[1]),
                       "lr": scheduler.get_last_lr()[0],
                       "tokens_per_s_per_worker": tokens / max(now - t0, 1e-9)}
            loss_acc.zero_()
            n_acc = 0
            if rank == 0:
                eta = (now - t0) / max(1, step - start_step) * (total - step)
                log.info("step %d/%d (%d%%) epoch %.2f/%d loss %.4f lr %.2e %.0f tok/s/worker "
                         "eta %dm%02ds", step, total, 100 * step // total, metrics["epoch"],
                         plan.epochs, metrics["train_loss"], metrics["lr"],
                         metrics["tokens_per_s_per_worker"], *divmod(int(eta), 60))
            if not is_ckpt:
                # Logged, not reported: each ray.train.report waits until Ray Train's controller
                # has taken the previous one, and it polls workers every 2 s
                # (RAY_TRAIN_HEALTH_CHECK_INTERVAL_S), so reports a few steps apart held a tiny
                # model's worker ~1.6 s each: 70% of a demo trial's time
                # (benchmarks/results/train_throughput_cpu.md). Checkpoints carry the history.
                continue
            metrics["probe_loss"] = probe_loss(engine.module, config["probe"], device)
            history.append({**metrics, "index": len(history), "attempt_start_step": start_step})
            with tempfile.TemporaryDirectory() as tmp:
                d = Path(tmp)
                engine.save_checkpoint(str(d / "ds"), tag="state")
                _save_hf(engine, d / "hf", config["tokenizer_path"], config["zero_stage"], rank)
                if rank == 0:
                    (d / "state.json").write_text(json.dumps(
                        {"step": step, "epoch": epoch, "history": history}, indent=1))
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp),
                                 checkpoint_dir_name=f"step_{step:07d}")
    if rank == 0:
        log.info("training finished at step %d/%d", step, total)
    if history and math.isnan(history[-1]["train_loss"]):
        raise FloatingPointError("training loss became NaN; lower the learning rate")
