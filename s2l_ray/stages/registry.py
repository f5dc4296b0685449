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
    StageInfo("ingest", "s2l_ray.stages.ingest:run_ingest",
              "read, validate, tokenize the instruction data; stable ids; rejects kept",
              "ingest/examples/*.parquet, ingest/rejects/"),
    StageInfo("train-ref", "s2l_ray.stages.train_ref:run_train_ref",
              "fine-tune the small reference model (Ray Train + DeepSpeed), T checkpoints",
              "train_ref/checkpoints/"),
    StageInfo("trajectories", "s2l_ray.stages.trajectories:run_trajectories",
              "loss of every example under every checkpoint (Ray Data actors)",
              "trajectories/*.parquet (id, losses[T])"),
    StageInfo("cluster", "s2l_ray.stages.cluster:run_cluster",
              "distributed faiss k-means over the trajectories",
              "cluster/assignments/, centroids"),
    StageInfo("select", "s2l_ray.stages.select:run_select",
              "spend the budget evenly across clusters (or a baseline)",
              "select/selected.jsonl"),
    StageInfo("sweep", "s2l_ray.stages.sweep:run_sweep",
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
    from s2l_ray.io.readers import check_allowed_roots, list_files
    from s2l_ray.models.specs import check_spec
    from s2l_ray.stages.given import preflight as given_inputs

    check_spec(cfg.reference.model, "reference.model")
    check_spec(cfg.target.model, "target.model")
    if cfg.data.tokenizer:
        check_spec(cfg.data.tokenizer, "data.tokenizer", weights=False)
    # Before anything reads them (list_files below included), so no outside path is touched.
    for key, path in (("data.source", cfg.data.source), ("data.eval_source", cfg.data.eval_source)):
        if path:
            check_allowed_roots(path, key, cfg.data.allowed_roots)
    src = cfg.data.source
    if src.startswith("demo:"):
        if src != "demo:mathmix":
            raise ConfigError(f"config key 'data.source': unknown demo '{src}'. "
                              "Fix: use demo:mathmix")
    elif not src.startswith("hf:"):
        list_files(src)
    given_inputs(cfg)  # reference.checkpoints, trajectories.source
    out = Path(cfg.run.output_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"config key 'run.output_dir': '{out}' is a file. Fix: name a folder")
    _check_writable(out)


def _check_writable(out: Path) -> None:
    """Create run.output_dir and write a probe file in it now, so that an unwritable folder is a
    clear error here and not a PermissionError traceback once a stage has done its work.
    Actually writing, because os.access is wrong for root, ACLs and NFS root squashing."""
    import tempfile

    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out, prefix=".s2l_probe"):
            pass
    except OSError as e:
        raise ConfigError(f"config key 'run.output_dir': cannot write to '{out}' "
                          f"({e.strerror or e}). Fix: choose a folder you can write to, or fix "
                          "its permissions") from e


def check_eval_source(cfg: S2LConfig) -> None:
    """The sweep evaluates on held-out data: make sure there is some before hours of work."""
    from s2l_ray.io.readers import list_files

    src = cfg.data.eval_source
    if src is None:
        if cfg.data.source != "demo:mathmix":
            raise ConfigError("config key 'data.eval_source': is not set, and the sweep stage "
                              "evaluates every fine-tuned target on held-out data. Fix: point "
                              "data.eval_source at a held-out file or folder (any ingestion "
                              "format) or 'hf:NAME' (with eval.split), or run `s2l select` to "
                              "stop after the selection")
    elif not src.startswith("hf:"):
        try:
            list_files(src)
        except ConfigError as e:
            raise ConfigError(str(e).replace("'data.source'", "'data.eval_source'")) from None


def run_stage(cfg: S2LConfig, name: str) -> None:
    if name not in BY_NAME:
        raise ConfigError(f"unknown stage '{name}'. Fix: use one of {', '.join(BY_NAME)}")
    preflight(cfg)
    if name == "sweep":
        check_eval_source(cfg)
    entry_of(BY_NAME[name])(cfg)


def run_pipeline(cfg: S2LConfig) -> list[str]:
    """Run every available stage in order; returns the names of those that ran or were current."""
    preflight(cfg)
    check_eval_source(cfg)
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
