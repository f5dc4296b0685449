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
    cluster/report.json                 sizes, final inertia, timings, memory per actor

No process ever holds all N x T losses: the driver holds K x T centroids and the init sample.
The labels are the same whatever cluster.num_workers and the Parquet layout (core.kmeans).
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
from s2l_ray.core.kmeans import ExactGrid, IdView, Shard
from s2l_ray.errors import config_keys
from s2l_ray.io.parquet import losses_matrix, parquet_files

log = logging.getLogger(__name__)
READ_BATCH = 65536  # rows per Parquet read batch: bounds what an actor holds beyond its shard


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
                 threads: int):
        import faiss
        import pyarrow as pa

        from s2l_ray.core.kmeans import features

        faiss.omp_set_num_threads(threads)
        self.number = index
        self.error: Exception | None = None
        n = sum(p.stop - p.start for p in pieces)
        feats = np.zeros((0, 1), np.float32)
        ids, sources, pos = [], [], 0
        try:  # batch by batch into one preallocated (n, T) array: no second copy of the shard
            for t in iter_pieces(pieces, ["id", "source", "losses"]):
                where = f"trajectories {Path(pieces[0].path).name}.. (shard {index})"
                x = features(losses_matrix(t["losses"], where), normalize, IdView(t["id"]))
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
        pa.default_memory_pool().release_unused()  # give the read buffers back to the OS
        super().__init__(pa.chunked_array(ids, pa.string()), feats[:pos], gpu=gpu)

    def info(self) -> dict[str, Any]:
        if self.error is not None:
            raise self.error
        return {**super().info(), **memory_mb()}

    def write(self, centroids: np.ndarray, grid: ExactGrid, folder: str) -> dict[str, Any]:
        """Label every row with the final centroids and write this shard's Parquet file."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        from s2l_ray.core.kmeans import on_grid

        dist, label = self.labels(centroids)
        table = pa.table({"id": self.ids, "cluster": pa.array(label.astype(np.int32)),
                          "distance": pa.array(dist), "source": self.sources})
        pq.write_table(table, str(Path(folder) / f"part-{self.number:05d}.parquet"))
        return {"n": len(label), "counts": np.bincount(label, minlength=len(centroids)),
                "inertia": float(on_grid(dist, grid.dist).sum()), **memory_mb()}


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

    def sample(self, seed: int, m: int) -> list[tuple[np.ndarray, list[str], np.ndarray]]:
        return self.call("sample", seed, m)

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


def fit_files(files: list[str], out_dir: str | Path, c: ClusterConfig, seed: int
              ) -> dict[str, Any]:
    """Cluster the trajectories in `files` with Ray actors; write the outputs into out_dir.

    Returns the report (also what the stage publishes). Ray must be initialised.
    """
    import ray

    from s2l_ray.core.kmeans import fit_shards

    out = Path(out_dir)
    (out / "assignments").mkdir(parents=True, exist_ok=True)
    plan = plan_shards(files, c.num_workers)
    cpus, gpu = _worker_resources(c, len(plan))
    Actor = ray.remote(ShardActor).options(num_cpus=cpus, num_gpus=1 if gpu else 0)
    shards = ActorShards([Actor.remote(i, p, c.normalize, gpu or None, max(1, int(cpus)))
                          for i, p in enumerate(plan)])
    call, actors = shards.call, shards.actors
    try:
        with config_keys("cluster"):  # k, init: named by their cluster.* key
            res = fit_shards(shards, c.k, seed=seed, max_iter=c.max_iter, tol=c.tol, init=c.init,
                             sample_per_centroid=c.init_sample_per_centroid,
                             on_iter=lambda r: log.info(
                                 "cluster: iteration %d inertia %.6g imbalance %.2f splits %d "
                                 "(%.2f s)", r["iteration"], r["inertia"], r["imbalance"],
                                 r["splits"], r["seconds"]))
            written = call("write", res.centroids, res.grid, str(out / "assignments"))
            memory = call("info")
    finally:
        for a in actors:
            ray.kill(a)
    sizes = sum(w["counts"] for w in written)
    np.save(out / "centroids.npy", res.centroids)
    (out / "iterations.json").write_text(json.dumps(res.history, indent=1) + "\n")
    iter_s = [h["seconds"] for h in res.history]
    report = {
        "examples": res.n, "dim": res.dim, "k": c.k, "normalize": c.normalize,
        "init": c.init, "fit_on": "all examples (init from a sample)",
        "iterations": len(res.history), "converged": res.converged,
        "final_inertia": sum(w["inertia"] for w in written),
        "cluster_sizes": sizes.tolist(), "imbalance": float(sizes.max() / sizes.mean()),
        "empty_clusters": int((sizes == 0).sum()), "workers": len(plan),
        "cpus_per_worker": cpus, "gpu": gpu, "shard_rows": res.shard_sizes,
        "init_seconds": res.init_seconds, "seconds_per_iteration": float(np.mean(iter_s)),
        "actor_peak_rss_mb": [m["peak_rss_mb"] for m in memory],
        "driver_peak_rss_mb": memory_mb()["peak_rss_mb"],
    }
    log.info("cluster: %d examples -> %d clusters in %d iterations (%s), inertia %.6g, "
             "sizes %d..%d", res.n, c.k, len(res.history),
             "converged" if res.converged else "max_iter reached", report["final_inertia"],
             sizes.min(), sizes.max())
    return report


def run(cfg: S2LConfig, inputs: dict[str, Path], tmp: Path) -> dict[str, Any]:
    """k-means over the trajectories; assignments, centroids, per-iteration stats into `tmp`."""
    return fit_files(parquet_files(inputs["trajectories"]), tmp, cfg.cluster, cfg.run.seed)
