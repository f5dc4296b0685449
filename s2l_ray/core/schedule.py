"""Training plan arithmetic (pure): steps per epoch, total steps, where the T checkpoints fall.

Ray Train splits the data evenly (`equal=True`), so every worker sees floor(N / W) examples per
epoch in micro-batches of `batch_size`; an optimizer step takes `grad_accum` micro-batches. The
micro-batches left over at the end of an epoch that cannot fill a whole step are read but not
trained on, so every worker runs exactly the same number of collective steps.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from s2l_ray.errors import ParamError


@dataclass(frozen=True)
class TrainPlan:
    n_examples: int
    world_size: int
    batch_size: int
    grad_accum: int
    epochs: int
    steps_per_epoch: int
    total_steps: int
    checkpoint_steps: tuple[int, ...]

    @property
    def micro_per_epoch(self) -> int:
        return math.ceil((self.n_examples // self.world_size) / self.batch_size)

    def epoch_of(self, step: int) -> int:
        """0-based epoch in which optimizer step `step` (1-based) happens."""
        return (step - 1) // self.steps_per_epoch

    def as_dict(self) -> dict:
        return asdict(self)


def even_checkpoints(total_steps: int, count: int) -> tuple[int, ...]:
    """`count` steps spread evenly over training, the last one at the final step."""
    return tuple(round(total_steps * (i + 1) / count) for i in range(count))


def make_plan(n_examples: int, world_size: int, batch_size: int, grad_accum: int, epochs: int,
              max_steps: int | None, num_checkpoints: int,
              checkpoint_steps: list[int] | None,
              train_steps: int | None = None) -> TrainPlan:
    """Check the training shape against the data and place the checkpoints, before any work.

    `train_steps` fixes the step count instead: as many epochs as it takes, the last one cut.
    """
    per_worker = n_examples // world_size
    if per_worker < batch_size * grad_accum:
        raise ParamError(
            "batch_size", f"{n_examples} examples over {world_size} workers give {per_worker} "
            f"per worker, fewer than one step of batch_size x grad_accum = "
            f"{batch_size * grad_accum}", "lower `batch_size`, `grad_accum` or `num_workers`")
    micro = math.ceil(per_worker / batch_size)
    steps_per_epoch = micro // grad_accum
    if train_steps is not None:
        epochs = math.ceil(train_steps / steps_per_epoch)
        max_steps = train_steps
    total = steps_per_epoch * epochs
    if max_steps is not None:
        total = min(total, max_steps)
    if checkpoint_steps:
        if checkpoint_steps[-1] > total:
            raise ParamError("checkpoint_steps", f"step {checkpoint_steps[-1]} is beyond the "
                             f"last step {total}", f"list steps up to {total}")
        steps = tuple(checkpoint_steps)
    else:
        if num_checkpoints > total:
            raise ParamError(
                "num_checkpoints", f"{num_checkpoints} checkpoints need at least as many "
                f"optimizer steps, but training has only {total}",
                f"set `num_checkpoints`<={total}, or train longer (`epochs`)")
        steps = even_checkpoints(total, num_checkpoints)
    return TrainPlan(n_examples, world_size, batch_size, grad_accum, epochs, steps_per_epoch,
                     total, steps)


def lr_at(step: int, total: int, peak: float, warmup_ratio: float) -> float:
    """Linear warm-up then cosine decay to 0 (HF's `cosine` schedule), step counted from 0."""
    warm = math.ceil(total * warmup_ratio)
    if step < warm:
        return peak * (step + 1) / warm
    progress = (step - warm) / max(1, total - warm)
    return peak * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
