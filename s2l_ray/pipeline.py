"""The stages in order, and running them: each is skipped when its published result is current."""

from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass
from pathlib import Path

from s2l_ray.config import ConfigError, S2LConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StageInfo:
    name: str  # CLI subcommand
    entry: str  # "module:function" taking an S2LConfig
    summary: str
    output: str


# The whole S2L pipeline, in order. `entry` is empty for stages not built yet.
PIPELINE = (
    StageInfo("ingest", "s2l_ray.ingest:run_ingest",
              "read, validate, tokenize the instruction data; stable ids; rejects kept",
              "ingest/examples/*.parquet, ingest/rejects/"),
    StageInfo("train-ref", "s2l_ray.train_ref:run_train_ref",
              "fine-tune the small reference model (Ray Train + DeepSpeed), T checkpoints",
              "train_ref/checkpoints/"),
    StageInfo("trajectories", "s2l_ray.trajectories:run_trajectories",
              "loss of every example under every checkpoint (Ray Data actors)",
              "trajectories/*.parquet (id, losses[T])"),
    StageInfo("cluster", "s2l_ray.cluster:run_cluster",
              "distributed faiss k-means over the trajectories",
              "cluster/assignments/, centroids"),
    StageInfo("select", "s2l_ray.select:run_select",
              "spend the budget evenly across clusters (or a baseline)",
              "select/selected.jsonl"),
    StageInfo("sweep", "s2l_ray.sweep:run_sweep",
              "Ray Tune: methods x budgets x seeds, fine-tune + evaluate the target",
              "sweep/results.csv, summary.md, trials/*/model"),
)
BY_NAME = {s.name: s for s in PIPELINE}


def available(info: StageInfo) -> bool:
    return bool(info.entry)


def entry_of(info: StageInfo):
    if not info.entry:
        raise ConfigError(f"stage '{info.name}' is not available in this version of s2l_ray. "
                          f"Fix: run the stages that are: "
                          f"{', '.join(s.name for s in PIPELINE if available(s))}")
    module, func = info.entry.split(":")
    return getattr(importlib.import_module(module), func)


def preflight(cfg: S2LConfig) -> None:
    """Checks that need the filesystem, done before any stage starts any work."""
    from s2l_ray.models import check_spec
    from s2l_ray.readers import list_files

    check_spec(cfg.reference.model, "reference.model")
    check_spec(cfg.target.model, "target.model")
    if cfg.data.tokenizer:
        check_spec(cfg.data.tokenizer, "data.tokenizer")
    src = cfg.data.source
    if src.startswith("demo:"):
        if src != "demo:mathmix":
            raise ConfigError(f"config key 'data.source': unknown demo '{src}'. "
                              "Fix: use demo:mathmix")
    elif not src.startswith("hf:"):
        list_files(src)
    out = Path(cfg.run.output_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"config key 'run.output_dir': '{out}' is a file. Fix: name a folder")


def run_stage(cfg: S2LConfig, name: str) -> None:
    if name not in BY_NAME:
        raise ConfigError(f"unknown stage '{name}'. Fix: use one of {', '.join(BY_NAME)}")
    preflight(cfg)
    entry_of(BY_NAME[name])(cfg)


def run_pipeline(cfg: S2LConfig) -> list[str]:
    """Run every available stage in order; returns the names of those that ran or were current."""
    preflight(cfg)
    done = []
    for info in PIPELINE:
        if not available(info):
            log.info("stage %s: not available in this version; the pipeline stops here",
                     info.name)
            break
        entry_of(info)(cfg)
        done.append(info.name)
    log.info("pipeline finished: %s (outputs under %s)", ", ".join(done), cfg.run.output_dir)
    return done
