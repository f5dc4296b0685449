"""Stage `cluster`: distributed faiss k-means over the loss trajectories.

    trajectories/*.parquet --row ranges--> ShardActor x cluster.num_workers (each reads and keeps
                                           only its own rows: ids + features (n_w, T) float32)
    driver: init from the hash-picked sample; per iteration it sends the centroids (K x T) and
            gets back per-cluster sums (K x T), counts (K) and inertia from every actor; reduces,
            updates, splits empty clusters (s2l_ray.core.kmeans)
    final:  every actor writes its labels, assignments/part-NNNNN.parquet

    cluster/assignments/part-*.parquet  id, cluster (int32), distance (float32, squared L2 in
                                        feature space), source (carried for the select stage)
    cluster/centroids.npy               (K, T) float32, in feature space (see cluster.normalize)
    cluster/iterations.json             per iteration: inertia, relative improvement, imbalance
                                        (largest / mean cluster size), empty clusters, splits
    cluster/clusters.json               per cluster: size, source (per_source), mean raw loss at
                                        the first and the last checkpoint (the noise cap's input)
    cluster/report.json                 sizes, final inertia, timings, memory per actor

No process ever holds all N x T losses: the driver holds K x T centroids and the init sample.
The labels are the same whatever cluster.num_workers and the Parquet layout (core.kmeans).
With cluster.per_source, the same loop runs once per source (actors focus on that source's
rows); clusters are numbered source after source (sorted, rows without a source first).
"""

from __future__ import annotations

import json
import logging
import resource
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from s2l_ray.config import ClusterConfig, ConfigError, S2LConfig
from s2l_ray.core.kmeans import INIT_SALT, ExactGrid, IdView, Shard
from s2l_ray.core.progress import DEFAULT_EVERY
from s2l_ray.errors import config_keys
from s2l_ray.io.parquet import losses_matrix, parquet_files

log = logging.getLogger(__name__)
READ_BATCH = 65536  # rows per Parquet read batch: bounds what an actor holds beyond its shard
LOSS_GRID = 2.0 ** -20  # per-cluster loss sums are sums of integers on this grid: exact in any
# order (|loss| < 2^20 and n < 2^23 keep them inside int64)


@dataclass(frozen=True)
class Piece:
    """Rows [start, stop) of one row group of one Parquet file."""

    path: str
    row_group: int
    start: int
    stop: int


def plan_shards(files: list[str], num_workers: int) -> list[list[Piece]]:
    """Split all rows (file by file, row group by row group) into num_workers equal ranges.

    Only the Parquet footers are read. Workers beyond the row count get no shard.
    """
    import pyarrow.parquet as pq

    groups = []  # (path, row group, rows)
    for f in files:
        meta = pq.ParquetFile(f).metadata
        groups += [(f, g, meta.row_group(g).num_rows) for g in range(meta.num_row_groups)]
    n = sum(r for _, _, r in groups)
    workers = max(1, min(num_workers, n))
    bounds = [n * w // workers for w in range(workers + 1)]
    shards: list[list[Piece]] = [[] for _ in range(workers)]
    offset = 0
    for path, g, rows in groups:
        for w in range(workers):
            a, b = max(bounds[w], offset), min(bounds[w + 1], offset + rows)
            if a < b:
                shards[w].append(Piece(path, g, a - offset, b - offset))
        offset += rows
    return shards


def iter_pieces(pieces: list[Piece], columns: list[str]) -> Any:
    """The rows of `pieces` as Arrow tables of <= READ_BATCH rows (absent columns: null)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    for p in pieces:
        pf = pq.ParquetFile(p.path)
        have = [c for c in columns if c in pf.schema_arrow.names]
        pos = 0
        for batch in pf.iter_batches(batch_size=READ_BATCH, row_groups=[p.row_group],
                                     columns=have):
            a, b = max(p.start - pos, 0), min(p.stop - pos, batch.num_rows)
            if a < b:
                t = pa.Table.from_batches([batch.slice(a, b - a)])
                for c in columns:
                    if c not in have:
                        t = t.append_column(c, pa.nulls(t.num_rows, pa.string()))
                yield t.select(columns)
            pos += batch.num_rows
            if pos >= p.stop:
                break


def memory_mb() -> dict[str, float]:
    """This process's resident memory now and at its peak, in MiB (Linux)."""
    import psutil

    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"rss_mb": psutil.Process().memory_info().rss / 2**20, "peak_rss_mb": peak_kb / 1024}


class ShardActor(Shard):
    """A Ray actor (see `fit_files`) holding one shard of the trajectories."""

    def __init__(self, index: int, pieces: list[Piece], normalize: str, gpu: bool | None,
                 threads: int, nan: str = "error"):
        import faiss
        import pyarrow as pa

        from s2l_ray.core.kmeans import features

        faiss.omp_set_num_threads(threads)
        self.number = index
        self.error: Exception | None = None
        n = sum(p.stop - p.start for p in pieces)
        feats = np.zeros((0, 1), np.float32)
        ends = np.zeros((n, 2), np.float32)  # raw loss at the first and last checkpoint
        ids, sources, pos = [], [], 0
        try:  # batch by batch into one preallocated (n, T) array: no second copy of the shard
            for t in iter_pieces(pieces, ["id", "source", "losses"]):
                where = f"trajectories {Path(pieces[0].path).name}.. (shard {index})"
                raw = features(losses_matrix(t["losses"], where), "none", IdView(t["id"]), nan)
                x = raw if normalize == "none" else features(raw, normalize)
                ends[pos:pos + len(x)] = raw[:, [0, -1]]
                if pos == 0:
                    feats = np.empty((n, x.shape[1]), np.float32)
                elif x.shape[1] != feats.shape[1]:
                    raise ValueError(f"{where}: trajectories of {feats.shape[1]} and "
                                     f"{x.shape[1]} checkpoints; rerun the trajectories stage")
                feats[pos:pos + len(x)] = x
                pos += len(x)
                ids += t["id"].chunks
                sources += t["source"].cast(pa.string()).chunks
        except ValueError as e:  # reported by info(), where the driver sees it
            self.error = e
        self.sources = pa.chunked_array(sources, pa.string())
        self.ends = ends[:pos]
        pa.default_memory_pool().release_unused()  # give the read buffers back to the OS
        super().__init__(pa.chunked_array(ids, pa.string()), feats[:pos], gpu=gpu)

    def info(self) -> dict[str, Any]:
        if self.error is not None:
            raise self.error
        return {**super().info(), **memory_mb()}

    def source_names(self) -> list[str | None]:
        return list(set(self.sources.to_pylist()))

    def set_parts(self, names: list[str | None]) -> None:
        """Number every row by its source's place in `names` (the driver's sorted list)."""
        where = {v: i for i, v in enumerate(names)}
        self.parts = np.fromiter((where[v] for v in self.sources.to_pylist()), np.int64,
                                 count=len(self.sources))

    def write(self, folder: str, k: int) -> dict[str, Any]:
        """Write this shard's labels (kept by keep_labels) as one Parquet file; return counts
        and the per-cluster loss sums (on LOSS_GRID, as int64) at the first/last checkpoint."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        label = self.final_label
        if len(label) and label.min() < 0:
            raise RuntimeError("cluster: a row was never labelled (a part was skipped)")
        table = pa.table({"id": self.all_ids, "cluster": pa.array(label.astype(np.int32)),
                          "distance": pa.array(self.final_dist), "source": self.sources})
        pq.write_table(table, str(Path(folder) / f"part-{self.number:05d}.parquet"))
        q = np.rint(self.ends.astype(np.float64) / LOSS_GRID).astype(np.int64)
        sums = np.zeros((k, 2), np.int64)
        np.add.at(sums, label, q)
        return {"n": len(label), "counts": np.bincount(label, minlength=k),
                "loss_sums": sums, **memory_mb()}


class ActorShards:
    """`core.kmeans.Shards` held by Ray actors (`ShardActor`): each call runs on every actor
    at once; arrays are put in the object store once for all of them."""

    def __init__(self, actors: list[Any]) -> None:
        self.actors = actors

    def call(self, method: str, *args: Any) -> list[Any]:
        import ray

        refs = [ray.put(a) if isinstance(a, np.ndarray) else a for a in args]  # one copy each
        return ray.get([getattr(a, method).remote(*refs) for a in self.actors])

    def info(self) -> list[dict[str, Any]]:
        return self.call("info")

    def sample(self, seed: int, m: int, salt: str = INIT_SALT
               ) -> list[tuple[np.ndarray, list[str], np.ndarray]]:
        return self.call("sample", seed, m, salt)

    def focus(self, part: int | None) -> list[None]:
        return self.call("focus", part)

    def keep_labels(self, centroids: np.ndarray, offset: int, grid: ExactGrid
                    ) -> list[tuple[np.ndarray, float]]:
        return self.call("keep_labels", centroids, offset, grid)

    def step(self, centroids: np.ndarray, grid: ExactGrid | None
             ) -> list[tuple[np.ndarray, np.ndarray, float]]:
        return self.call("step", centroids, grid)


def _worker_resources(c: ClusterConfig, workers: int) -> tuple[float, bool]:
    import faiss

    from s2l_ray.runtime import cluster_has_gpus

    gpu_faiss = hasattr(faiss, "StandardGpuResources")  # only GPU builds of faiss have it
    use_gpu = cluster_has_gpus() and gpu_faiss if c.use_gpu is None else c.use_gpu
    if use_gpu and not cluster_has_gpus():
        raise ConfigError("config key 'cluster.use_gpu': true, but the Ray cluster has no GPU. "
                          "Fix: set cluster.use_gpu=null (or false), or add GPU nodes")
    import ray

    from s2l_ray.runtime import check_cpu_headroom

    total = ray.cluster_resources().get("CPU", 1.0)
    cpus = c.cpus_per_worker or min(1.0, total / workers)
    check_cpu_headroom(workers, cpus, "cluster.cpus_per_worker", "cluster.num_workers",
                       "k-means actors", leave=0)  # they read their own shards
    return cpus, bool(use_gpu)


def fit_files(files: list[str], out_dir: str | Path, c: ClusterConfig, seed: int,
              every: float = DEFAULT_EVERY) -> dict[str, Any]:
    """Cluster the trajectories in `files` with Ray actors; write the outputs into out_dir.
    `every`: seconds between progress lines (iterations done, rate, time left at most).

    Returns the report (also what the stage publishes). Ray must be initialised.
    """
    import ray

    from s2l_ray.core.kmeans import fit_labels
    from s2l_ray.core.progress import Progress

    out = Path(out_dir)
    (out / "assignments").mkdir(parents=True, exist_ok=True)
    plan = plan_shards(files, c.num_workers)
    cpus, gpu = _worker_resources(c, len(plan))
    Actor = ray.remote(ShardActor).options(num_cpus=cpus, num_gpus=1 if gpu else 0)
    shards = ActorShards([Actor.remote(i, p, c.normalize, gpu or None, max(1, int(cpus)),
                                       c.nan_losses) for i, p in enumerate(plan)])
    call, actors = shards.call, shards.actors

    def on_iter(r: dict[str, Any]) -> None:
        progress.add(1)
        log.info("cluster: iteration %d inertia %.6g imbalance %.2f splits %d (%.2f s)",
                 r["iteration"], r["inertia"], r["imbalance"], r["splits"], r["seconds"])

    # Iterations up to max_iter: the ETA is an upper bound (k-means may converge earlier).
    progress = Progress("cluster", c.max_iter, "iterations", rate_unit="it/s", every=every,
                        logger=log).start()
    try:
        call("info")  # raises a shard's read error here
        names = source_names(call) if c.per_source else None
        if names is not None:
            call("set_parts", names)
        if names is not None and progress.total is not None:
            progress.total = c.max_iter * len(names)  # an upper bound: parts may converge early
        history: list[dict[str, Any]] = []

        def on_part(p: int, offset: int, r: Any) -> None:
            history.extend({"part": p, "source": None if names is None else names[p],
                            "first_cluster": offset, **h} for h in r.history)

        with config_keys("cluster"):  # k, init, nan_losses: named by their cluster.* key
            cents, _, inertia, results = fit_labels(
                shards, c.k, None if names is None else len(names), seed=seed,
                max_iter=c.max_iter, tol=c.tol, init=c.init,
                sample_per_centroid=c.init_sample_per_centroid,
                train_sample_per_centroid=c.train_sample_per_centroid, on_part=on_part,
                on_iter=on_iter)
        written = call("write", str(out / "assignments"), len(cents))
        memory = call("info")
    finally:
        speed = progress.stop()
        for a in actors:
            ray.kill(a)
    sizes = sum(w["counts"] for w in written)
    loss_sums = sum(w["loss_sums"] for w in written) * LOSS_GRID  # exact, then scaled
    np.save(out / "centroids.npy", cents)
    (out / "iterations.json").write_text(json.dumps(history, indent=1) + "\n")
    cluster_source = (None if names is None else
                      [names[p] for p, r in enumerate(results) for _ in range(len(r.centroids))])
    write_cluster_stats(out, sizes, loss_sums, c.per_source, cluster_source)
    iter_s = [h["seconds"] for h in history]
    n = sum(w["n"] for w in written)
    report = {
        "examples": n, "dim": results[0].dim, "k": c.k, "clusters": len(cents),
        "per_source": c.per_source, "sources": names, "normalize": c.normalize,
        "init": c.init, "nan_losses": c.nan_losses,
        "fit_on": ("all examples (init from a sample)" if c.train_sample_per_centroid is None
                   else f"at most {c.train_sample_per_centroid} sampled examples per centroid"),
        "iterations": len(history), "converged": all(r.converged for r in results),
        "final_inertia": inertia,
        "cluster_sizes": sizes.tolist(), "imbalance": float(sizes.max() / sizes.mean()),
        "empty_clusters": int((sizes == 0).sum()), "workers": len(plan),
        "cpus_per_worker": cpus, "gpu": gpu, "shard_rows": [w["n"] for w in written],
        "init_seconds": sum(r.init_seconds for r in results),
        "seconds_per_iteration": float(np.mean(iter_s)),
        "seconds": speed["seconds"], "examples_per_s": n / speed["seconds"],
        "actor_peak_rss_mb": [m["peak_rss_mb"] for m in memory],
        "driver_peak_rss_mb": memory_mb()["peak_rss_mb"],
    }
    log.info("cluster: %d examples -> %d clusters in %d iterations (%s), inertia %.6g, "
             "sizes %d..%d%s", n, len(cents), len(history),
             "converged" if report["converged"] else "max_iter reached", inertia,
             sizes.min(), sizes.max(), "" if names is None else f", {len(names)} sources")
    return report


def source_names(call: Any) -> list[str | None]:
    """Every actor's distinct sources, sorted as `selection.source_groups` does (None first)."""
    from s2l_ray.core.selection import source_groups

    names, _ = source_groups([v for part in call("source_names") for v in part])
    return names


def write_cluster_stats(out: Path, sizes: np.ndarray, loss_sums: np.ndarray, per_source: bool,
                        cluster_source: list[str | None] | None) -> None:
    """cluster/clusters.json: what the select stage needs besides the labels."""
    with np.errstate(invalid="ignore", divide="ignore"):
        means = loss_sums / sizes[:, None]  # (K, 2); NaN for an empty cluster
    stats = {"per_source": per_source, "sizes": sizes.tolist(),
             "source": cluster_source,
             "first_loss": [None if not np.isfinite(v) else float(v) for v in means[:, 0]],
             "last_loss": [None if not np.isfinite(v) else float(v) for v in means[:, 1]]}
    (out / "clusters.json").write_text(json.dumps(stats) + "\n")


def run(cfg: S2LConfig, inputs: dict[str, Path], tmp: Path) -> dict[str, Any]:
    """k-means over the trajectories; assignments, centroids, per-iteration stats into `tmp`."""
    return fit_files(parquet_files(inputs["trajectories"]), tmp, cfg.cluster, cfg.run.seed,
                     every=cfg.run.progress_seconds)
