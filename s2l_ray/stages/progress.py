"""Progress of work that runs in Ray workers, logged by the driver (see `core.progress`).

Workers (Ray Train workers, Ray Data tasks, Tune trials) push counts to one small `ProgressSink`
actor, fire-and-forget; the driver's `Progress` thread polls it at the log cadence. So the lines
come from the driver's logger, in the driver's log (a terminal or `ray job submit` output), and
not from whichever worker happened to be running.
"""

from __future__ import annotations

from typing import Any

from s2l_ray.config import S2LConfig
from s2l_ray.core.progress import Progress


def stage_progress(cfg: S2LConfig, name: str, total: float | None, unit: str = "examples",
                   **kwargs: Any) -> Progress:
    """A (not yet started) Progress at the run's cadence (run.progress_seconds)."""
    import logging

    return Progress(name, total, unit, every=cfg.run.progress_seconds,
                    logger=logging.getLogger(f"s2l_ray.stages.{name.split()[0]}"), **kwargs)


class _ProgressSink:
    """Counts keyed by worker (rank, trial, block), so a retried or repeated report replaces
    its earlier value instead of adding to it; `total` is their sum."""

    def __init__(self) -> None:
        self.counts: dict[str, float] = {}

    def set(self, key: str, value: float) -> None:
        self.counts[key] = value

    def add(self, key: str, value: float) -> None:
        self.counts[key] = self.counts.get(key, 0.0) + value

    def total(self) -> float:
        return sum(self.counts.values())

    def get(self, key: str) -> float | None:
        return self.counts.get(key)

    def all(self) -> dict[str, float]:
        return dict(self.counts)


def progress_sink() -> Any:
    """A ProgressSink actor pinned to the driver's node (it dies with the driver, not with a
    worker node), using no CPU."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    return ray.remote(num_cpus=0)(_ProgressSink).options(
        scheduling_strategy=NodeAffinitySchedulingStrategy(
            ray.get_runtime_context().get_node_id(), soft=False)).remote()


def polled(sink: Any, key: str | None = None, timeout: float = 5.0) -> Any:
    """The `poll` callable for Progress: the sink's count under `key` (None: the sum of all),
    or None when there is none yet or the sink does not answer in time."""
    import ray

    def poll() -> float | None:
        try:
            got = ray.get(sink.total.remote() if key is None else sink.get.remote(key),
                          timeout=timeout)
        except ray.exceptions.GetTimeoutError:
            return None
        return None if got is None else float(got)

    return poll
