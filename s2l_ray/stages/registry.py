"""The stages, each declared once, and the one runner that orders and runs them.

    ingest -> train-ref -> trajectories -> cluster -> select
                                                  \\-> sweep

A stage is a `StageSpec`: its name (the CLI command), its output folder, the config sections it
reads, the stages it depends on (`needs`), and `run(cfg, inputs, workdir) -> report`. `inputs`
maps the name of every stage upstream of it (direct or not) to that stage's published folder;
`workdir` is the stage's work folder (`Stage.begin`). A stage never calls another stage: the
runner (`run_stage`) takes the stages the asked one needs, in order, checks each one's marker
once (downloading it from run.storage_uri when it is there), and runs only those not done.

A stage's fingerprint is the hash of its sections, its direct upstream stages' fingerprints and
its `extra` strings (the seed, the tokenizer), so it changes whenever anything it depends on does.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from s2l_ray.config import ConfigError, S2LConfig
from s2l_ray.stages.base import Stage

log = logging.getLogger(__name__)


def _seed(cfg: S2LConfig) -> tuple[str, ...]:
    return (f"seed={cfg.run.seed}",)


def _select_options(cfg: S2LConfig) -> tuple[str, ...]:
    """The select options a sweep's trials inherit: all of cfg.select but the method and the
    budget, which the sweep sets per trial (so `s2l select budget=...` leaves a sweep current)."""
    import dataclasses
    import json

    opts = {k: v for k, v in dataclasses.asdict(cfg.select).items()
            if k not in ("method", "budget")}
    return (f"select={json.dumps(opts, sort_keys=True, default=str)}",)


def _tokenizer(cfg: S2LConfig) -> tuple[str, ...]:
    from s2l_ray.models.specs import tokenizer_spec

    return (tokenizer_spec(cfg),)


@dataclass(frozen=True)
class StageSpec:
    name: str  # CLI subcommand and key in `inputs`
    folder: str  # <run.output_dir>/<folder>/
    sections: tuple[str, ...]  # config sections it reads (fingerprinted)
    needs: tuple[str, ...]  # stages whose results it reads, directly (fingerprinted)
    run: str  # "module:function", run(cfg, inputs, workdir) -> report dict
    summary: str  # one line for --help
    output: str  # what the folder holds, for --help
    bare: str  # section whose keys the stage's CLI command takes without a prefix
    check: str | None = None  # "module:function", check(cfg, inputs): fails before any work
    extra: Callable[[S2LConfig], tuple[str, ...]] | None = None  # more fingerprinted values
    resumable: bool = False  # keep the work folder of an interrupted run of the same config

    def function(self, which: str = "run") -> Callable[..., Any]:
        module, func = getattr(self, which).split(":")
        return getattr(importlib.import_module(module), func)


# The whole S2L pipeline, in the order `s2l run` runs it.
STAGES = (
    StageSpec("ingest", "ingest", ("data", "demo"), (), "s2l_ray.stages.ingest:run",
              "read, validate, tokenize the instruction data; stable ids; rejects kept",
              "ingest/examples/*.parquet, ingest/rejects/", "data", extra=_tokenizer),
    StageSpec("train-ref", "train_ref", ("reference",), ("ingest",),
              "s2l_ray.stages.train_ref:run",
              "fine-tune the small reference model (Ray Train + DeepSpeed), T checkpoints",
              "train_ref/checkpoints/", "reference", check="s2l_ray.stages.train_ref:check",
              extra=_seed, resumable=True),
    StageSpec("trajectories", "trajectories", ("trajectories",), ("train-ref",),
              "s2l_ray.stages.trajectories:run",
              "loss of every example under every checkpoint (Ray Data actors)",
              "trajectories/group-*.parquet (id, losses[T])", "trajectories",
              check="s2l_ray.stages.trajectories:check",
              resumable=True),  # complete group files of an interrupted run are reused
    StageSpec("cluster", "cluster", ("cluster",), ("trajectories",), "s2l_ray.stages.cluster:run",
              "distributed faiss k-means over the trajectories",
              "cluster/assignments/, centroids", "cluster", extra=_seed),
    StageSpec("select", "select", ("select",), ("cluster",), "s2l_ray.stages.select:run",
              "spend the budget evenly across clusters (or a baseline)",
              "select/selected.jsonl", "select", extra=_seed),
    StageSpec("sweep", "sweep", ("sweep", "target", "eval"), ("cluster",),
              "s2l_ray.stages.sweep:run",
              "Ray Tune: methods x budgets x seeds, fine-tune + evaluate the target",
              "sweep/results.csv, summary.md, trials/*/model", "sweep",
              check="s2l_ray.stages.sweep:check", extra=_select_options, resumable=True),
)
BY_NAME = {s.name: s for s in STAGES}


def spec_of(name: str) -> StageSpec:
    if name not in BY_NAME:
        raise ConfigError(f"unknown stage '{name}'. Fix: use one of {', '.join(BY_NAME)}")
    return BY_NAME[name]


def plan(*names: str) -> list[StageSpec]:
    """The asked stages and every stage they need, directly or not, in pipeline order."""
    for n in names:
        spec_of(n)
    wanted = set(names)
    for s in reversed(STAGES):  # needs always come earlier in STAGES
        if s.name in wanted:
            wanted.update(s.needs)
    return [s for s in STAGES if s.name in wanted]


def stages(cfg: S2LConfig, *names: str) -> dict[str, Stage]:
    """The folder objects (with fingerprints) of `names` and their upstream stages, in order.
    Reads nothing: the fingerprints come from the config alone."""
    out: dict[str, Stage] = {}
    for s in plan(*names):
        up = tuple(out[n].fingerprint for n in s.needs) + (s.extra(cfg) if s.extra else ())
        out[s.name] = Stage(cfg, s.folder, s.sections, upstream=up)
    return out


def stage_for(cfg: S2LConfig, name: str) -> Stage:
    """The folder object of one stage (where its result is or will be published)."""
    return stages(cfg, name)[name]


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


def _run_one(cfg: S2LConfig, spec: StageSpec, st: Stage, inputs: dict[str, Path]) -> None:
    """Run one stage whose result is missing: its checks, its work folder, its work, publish."""
    if spec.check:
        spec.function("check")(cfg, inputs)
    workdir = st.begin(keep_tmp=spec.resumable)
    report = spec.function()(cfg, inputs, workdir)
    st.publish(report)


def run(cfg: S2LConfig, *names: str) -> dict[str, Stage]:
    """Run the stages `names` and those they need that are not done yet, in order; returns
    every stage of the plan (published folders). The preflight checks (and the held-out data
    check, when the sweep is in the plan) come before any of them."""
    order = stages(cfg, *names)
    preflight(cfg)
    if "sweep" in order:
        check_eval_source(cfg)
    published: dict[str, Path] = {}
    for n, st in order.items():
        spec = BY_NAME[n]
        if st.needs_run():  # the one marker check (and storage fetch) of this stage
            upstream = [s.name for s in plan(n) if s.name != n]
            _run_one(cfg, spec, st, {u: published[u] for u in upstream})
        published[n] = st.path
        if n == "ingest" and len(order) > 1:  # counts known: check what they rule out, now
            from s2l_ray.stages.checks import check_counts

            check_counts(cfg, st.path, list(order)[-1])
    return order


def run_stage(cfg: S2LConfig, name: str) -> Stage:
    """Run `name` (and what it needs); returns its published folder."""
    return run(cfg, name)[name]


def run_pipeline(cfg: S2LConfig) -> list[str]:
    """Run every stage in order (each skipped when current); returns their names."""
    done = list(run(cfg, *BY_NAME))
    log.info("pipeline finished: %s (outputs under %s)", ", ".join(done), cfg.run.output_dir)
    return done
