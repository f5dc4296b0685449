"""Settings that are impossible for the data, caught as soon as the counts are known and before
any training: ingest's report (the number of valid examples) is all they need.

The runner calls `check_counts` once ingest is published, before the next stage; each
check covers a stage the requested run will reach (the reference model's steps for train-ref and
beyond, cluster.k for cluster and beyond).
"""

from __future__ import annotations

from pathlib import Path

from s2l_ray.config import ConfigError, S2LConfig

ORDER = ("ingest", "train-ref", "trajectories", "cluster", "select", "sweep")


def check_counts(cfg: S2LConfig, ingest_dir: Path, last_stage: str) -> None:
    """Run the checks for every stage up to `last_stage` against the published ingest report
    in `ingest_dir`."""
    from s2l_ray.stages.base import read_report

    check_counts_for(cfg, int(read_report(ingest_dir)["valid"]), last_stage)


def check_counts_for(cfg: S2LConfig, n_examples: int, last_stage: str) -> None:
    """The same checks the stages make once they start, made with `n_examples` now."""
    from s2l_ray.core.schedule import make_plan

    reach = ORDER.index(last_stage) if last_stage in ORDER else len(ORDER) - 1
    if reach >= ORDER.index("train-ref"):
        from s2l_ray.errors import config_keys

        r = cfg.reference  # raises on num_checkpoints > steps, or a batch larger than the data
        with config_keys("reference"):
            make_plan(n_examples, r.num_workers, r.batch_size, r.grad_accum, r.epochs,
                      r.max_steps, r.num_checkpoints, r.checkpoint_steps, r.train_steps)
    if reach >= ORDER.index("cluster") and cfg.cluster.k > n_examples:
        raise ConfigError(
            f"config key 'cluster.k': {cfg.cluster.k} clusters for {n_examples} examples (the "
            f"valid rows ingest found). Fix: use at most {n_examples} clusters (about 100 for "
            "~100k examples); caught before training, nothing else has run")
