"""The Python API: what the `s2l` command line does, as functions, for notebooks and pipelines.

    cfg = load("demo", {"demo.n_train": 500})      # YAML path, packaged name, dict or None
    run = run_pipeline(cfg, until="select")        # runs what `select` needs, skips done stages
    run.selected_ids, run.path("select"), run.report("cluster"), run.sweep_table()
    sel = select(losses, budget=0.1, k=20, seed=0) # no Ray: a (n, T) matrix in, a selection out

The command line is a thin layer over `load`, `run_pipeline` and `report`. Stage outputs stay
where the stages publish them (`<run.output_dir>/<stage>/`); `Run` hands back their paths and
reads the small ones (selected ids, reports, the sweep table) as Python and pyarrow objects.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from s2l_ray.config import ConfigError, S2LConfig, load_config

PACKAGED = Path(__file__).parent / "configs"


def config_path(name: str | Path) -> Path:
    """A YAML path, or the name of a packaged config ('demo', 'mathinstruct')."""
    p = Path(name)
    if p.is_file():
        return p
    packaged = PACKAGED / f"{name}.yaml"
    if packaged.is_file() and not p.suffix:
        return packaged
    names = ", ".join(sorted(f.stem for f in PACKAGED.glob("*.yaml")))
    raise ConfigError(f"config '{name}' is neither a file nor a packaged config. Fix: give a "
                      f"YAML path, or one of: {names}")


def _override_list(overrides: Mapping[str, Any] | Sequence[str] | None) -> list[str]:
    """{'select.budget': 0.2} or ['select.budget=0.2'] -> ['select.budget=0.2']."""
    if overrides is None:
        return []
    if isinstance(overrides, Mapping):
        # JSON is YAML: lists, strings with spaces, null and booleans keep their meaning.
        return [f"{k}={json.dumps(v)}" for k, v in overrides.items()]
    if isinstance(overrides, str):
        raise TypeError("overrides: give a list of 'key=value' strings or a dict, not one string")
    return list(overrides)


def load(config: str | Path | Mapping[str, Any] | S2LConfig | None = None,
         overrides: Mapping[str, Any] | Sequence[str] | None = None) -> S2LConfig:
    """A checked config: from a YAML path, a packaged config name ('demo'), a dict of sections
    ({'select': {'budget': 0.2}}), an S2LConfig, or None (the defaults); then `overrides`, a
    dict of dotted keys ({'select.budget': 0.2}) or 'key=value' strings. Raises ConfigError
    naming the key and the fix."""
    extra = _override_list(overrides)
    if isinstance(config, S2LConfig):
        return load_config(None, extra, base=config.to_dict())
    if isinstance(config, Mapping):
        return load_config(None, extra, base=json.loads(json.dumps(config)))  # a deep copy
    return load_config(None if config is None else config_path(config), extra)


def _folders() -> dict[str, str]:
    """Stage names as the CLI spells them -> the folder each publishes into (the registry's)."""
    from s2l_ray.stages.registry import STAGES

    return {s.name: s.folder for s in STAGES}


def _stage_name(name: str) -> str:
    key = name.replace("_", "-")
    if key not in _folders():
        raise ConfigError(f"unknown stage '{name}'. Fix: use one of {', '.join(_folders())}")
    return key


@dataclass(frozen=True)
class Run:
    """A run's output folder, read through its published stages."""

    cfg: S2LConfig

    @property
    def output_dir(self) -> Path:
        return Path(self.cfg.run.output_dir)

    def path(self, stage: str) -> Path:
        """The folder a stage publishes into (`run.output_dir/<stage>`)."""
        return self.output_dir / _folders()[_stage_name(stage)]

    def done(self, stage: str) -> bool:
        return (self.path(stage) / "_SUCCESS.json").is_file()

    def _need(self, stage: str) -> Path:
        if not self.done(stage):
            raise FileNotFoundError(f"stage '{stage}' is not finished in {self.output_dir}. "
                                    f"Fix: run_pipeline(cfg, until='{stage}')")
        return self.path(stage)

    def report(self, stage: str) -> dict[str, Any]:
        """The stage's report.json (counts, timings, rates)."""
        return json.loads((self._need(stage) / "report.json").read_text(encoding="utf-8"))

    @property
    def selected_ids(self) -> list[str]:
        """The select stage's ids, in selection order."""
        return self.selection().column("id").to_pylist()

    def selection(self) -> Any:
        """select/selected.parquet as a pyarrow Table (id, cluster, source)."""
        import pyarrow.parquet as pq

        return pq.read_table(self._need("select") / "selected.parquet")

    def trajectories(self) -> Any:
        """The trajectories as a pyarrow Table (id, source, n_response_tokens, losses[T])."""
        return _read_parquet(self._need("trajectories"), "trajectories")

    def assignments(self) -> Any:
        """cluster/assignments as a pyarrow Table (id, cluster, distance, source)."""
        return _read_parquet(self._need("cluster") / "assignments", "cluster")

    def sweep_table(self) -> Any:
        """sweep/results.parquet as a pyarrow Table, one row per trial (`.to_pandas()` for a
        DataFrame)."""
        import pyarrow.parquet as pq

        return pq.read_table(self._need("sweep") / "results.parquet")

    def report_page(self) -> Path:
        """Write the run's report (PNG plots, index.md, index.html); returns index.html."""
        return report(self.output_dir)


def _read_parquet(folder: Path, stage: str) -> Any:
    """The Parquet files of a stage folder (not its config.yaml or manifest) as one table."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from s2l_ray.io.parquet import parquet_files

    return pa.concat_tables([pq.read_table(f) for f in parquet_files(folder, stage)])


def open_run(where: str | Path | S2LConfig) -> Run:
    """A finished (or partial) run, from its output folder or its config."""
    if isinstance(where, S2LConfig):
        return Run(where)
    folder = Path(where).expanduser().resolve()
    for stage in reversed(_folders().values()):  # the latest stage's snapshot has every section
        snap = folder / stage / "config.yaml"
        if snap.is_file():
            return Run(load_config(snap, [f"run.output_dir={folder}"]))
    raise FileNotFoundError(f"{folder} holds no published stage. Fix: pass a run's "
                            "run.output_dir, or run the pipeline first")


def run_pipeline(config: str | Path | Mapping[str, Any] | S2LConfig | None = None,
                 overrides: Mapping[str, Any] | Sequence[str] | None = None, *,
                 until: str | None = None) -> Run:
    """Run the pipeline up to and including stage `until` (None: every stage, the sweep too,
    which also writes the report), skipping stages whose published result is current. Starts
    or joins Ray as the config says. Returns the Run to read the outputs from."""
    from s2l_ray.stages import registry

    cfg = load(config, overrides)
    if until is None:
        done = registry.run_pipeline(cfg)
        if "sweep" in done:  # the pictures of a finished sweep: cheap and current
            report(cfg.run.output_dir)
    else:
        registry.run_stage(cfg, _stage_name(until))
    return Run(cfg)


def report(run_dir: str | Path, examples_per_cluster: int = 3) -> Path:
    """`s2l report`: PNG plots, index.md and the self-contained index.html of a run (no Ray);
    returns the path of index.html."""
    from s2l_ray.stages.report import make_report

    make_report(run_dir, examples_per_cluster=examples_per_cluster)
    return Path(run_dir).expanduser().resolve() / "report" / "index.html"


# ---------------------------------------------------------------------------------------------
# selection from losses in memory


@dataclass(frozen=True)
class Selection:
    """What `select` chose. Row indices refer to the rows of the `losses` given."""

    ids: list[str]  # the selected ids, in selection order (cluster by cluster)
    indices: np.ndarray  # (B,) int64 rows of `losses`, same order
    labels: np.ndarray | None  # (n,) int64 cluster of every row (s2l only)
    cluster_sizes: np.ndarray | None  # (k,) examples per cluster (s2l only)
    taken: np.ndarray | None  # (k,) selected per cluster (s2l only)


def select(losses: np.ndarray, budget: int | float, k: int = 100, seed: int = 42, *,
           ids: Sequence[str] | None = None, method: str = "s2l",
           sources: Sequence[str | None] | None = None,
           normalize: str = "none", max_iter: int = 20, tol: float = 1e-4,
           init: str = "kmeans++", sample_per_centroid: int = 64,
           early_fraction: float = 0.2) -> Selection:
    """Turn a loss-trajectory matrix into a selection, in this process (no Ray, no files).

    losses: (n, T), example i's loss at each of T reference checkpoints in order. budget: a
    count, or a fraction in (0, 1]. s2l clusters the rows with k-means (`k`, `normalize`,
    `max_iter`, `tol`, `init`, `sample_per_centroid`, seeded by `seed`) and spends the budget
    evenly over the clusters, smallest first; the other methods are the baselines
    (`stratified` needs `sources`). `ids` default to '0'..'n-1'. With the same ids, losses,
    k and seed, the result is the pipeline's (cluster + select stages) whatever its workers.
    """
    from s2l_ray.core import kmeans
    from s2l_ray.core import selection as core

    x = np.asarray(losses)
    if x.ndim != 2 or x.shape[0] < 1 or x.shape[1] < 1:
        raise ValueError(f"losses must be a non-empty (n, T) array, got shape {x.shape}")
    names = [str(i) for i in range(len(x))] if ids is None else [str(i) for i in ids]
    if len(names) != len(x):
        raise ValueError(f"{len(names)} ids for {len(x)} rows of losses")
    labels = sizes = taken = None
    if method == "s2l":
        fit = kmeans.fit(names, x, k, seed=seed, max_iter=max_iter, tol=tol, init=init,
                         sample_per_centroid=sample_per_centroid, normalize=normalize)
        labels = fit.labels.astype(np.int64)
        chosen = core.select("s2l", names, budget, seed, labels=labels)
        sizes = np.bincount(labels, minlength=k)
    else:
        chosen = core.select(method, names, budget, seed, sources=sources, losses=x,
                             early_fraction=early_fraction)
    row = {name: i for i, name in enumerate(names)}
    indices = np.fromiter((row[i] for i in chosen), np.int64, count=len(chosen))
    if labels is not None:
        taken = np.bincount(labels[indices], minlength=k)
    return Selection(chosen, indices, labels, sizes, taken)
