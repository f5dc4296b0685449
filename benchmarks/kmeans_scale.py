"""Benchmark: the distributed k-means of the cluster stage vs single-process faiss.Kmeans.

For each case N:T:K:iters it writes N synthetic trajectories (T losses each) as Parquet shards,
then on the same data in the same run
  * faiss.Kmeans in one process (all N x T floats in memory, every core, trained on ALL points:
    max_points_per_centroid is raised so faiss does not subsample),
  * s2l_ray.stages.cluster.fit_files on a local Ray, 1, 2, ... shard actors (each holding only its
    shard; together they use every core),
and reports time per Lloyd iteration, peak memory per process, the objective reached and
whether the labels are identical across worker counts.

    python benchmarks/kmeans_scale.py                        # default cases, a few minutes
    python benchmarks/kmeans_scale.py --cases 1000000:20:1000:5 --workers 1,2,4

The markdown table goes to benchmarks/results/kmeans_scale_cpu.md (and stdout).
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing as mp
import os
import platform
import resource
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DEFAULT_CASES = ["1000000:12:100:10", "1000000:12:1000:5", "10000000:10:100:3"]
ROWS_PER_FILE = 1_000_000
ROW_GROUP = 131_072
log = logging.getLogger("kmeans_scale")


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def make_data(folder: Path, n: int, t: int, seed: int = 0) -> list[str]:
    """n trajectories around 64 seeded decreasing loss curves, in files of 1M rows."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    stamp = folder / "params.json"
    params = {"n": n, "t": t, "seed": seed, "rows_per_file": ROWS_PER_FILE}
    if stamp.is_file() and json.loads(stamp.read_text()) == params:
        return sorted(str(p) for p in folder.glob("*.parquet"))
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    curves = np.sort(rng.uniform(0.2, 4.0, (64, t)), axis=1)[:, ::-1]  # (64, t) decreasing
    names = np.array(["alpaca", "gsm8k", "math", "code", "chat"])
    for f, start in enumerate(range(0, n, ROWS_PER_FILE)):
        m = min(ROWS_PER_FILE, n - start)  # one file at a time: m x t floats in memory
        x = (curves[rng.integers(0, 64, m)] * rng.uniform(0.7, 1.3, (m, 1))
             + rng.normal(0, 0.15, (m, t))).astype(np.float32)
        pq.write_table(pa.table({
            "id": pa.array([f"{start + i:012x}" for i in range(m)], pa.string()),
            "source": pa.array(names[rng.integers(0, 5, m)]),
            "n_response_tokens": pa.array(rng.integers(5, 500, m).astype(np.int32)),
            "losses": pa.FixedSizeListArray.from_arrays(pa.array(x.ravel()), t),
        }), folder / f"part-{f:04d}.parquet", row_group_size=ROW_GROUP)
    stamp.write_text(json.dumps(params))
    return sorted(str(p) for p in folder.glob("*.parquet"))


def faiss_run(files: list[str], k: int, iters: int, seed: int) -> dict[str, Any]:
    """Single-process faiss.Kmeans on all the data (run in a fresh process: clean peak RSS)."""
    import faiss
    import pyarrow.parquet as pq

    from s2l_ray.core.kmeans import objective
    from s2l_ray.stages.cluster import losses_matrix

    x = np.concatenate([losses_matrix(pq.read_table(f, columns=["losses"])["losses"], f)
                        for f in files])
    n, t = x.shape
    km = faiss.Kmeans(t, k, niter=iters, seed=seed, max_points_per_centroid=n // k + 1,
                      verbose=False)
    t0 = time.perf_counter()
    km.train(x)
    train_s = time.perf_counter() - t0
    return {"s_per_iter": train_s / iters, "objective": objective(x, km.centroids),
            "peak_rss_mb": _peak_mb(), "data_mb": x.nbytes / 2**20,
            "threads": faiss.omp_get_max_threads()}


def in_subprocess(fn: Any, *args: Any) -> Any:
    with mp.get_context("spawn").Pool(1) as pool:
        return pool.apply(fn, args)


def labels_in_row_order(folder: Path) -> np.ndarray:
    """Cluster of every row in the input row order (shards are contiguous row ranges)."""
    import pyarrow.parquet as pq

    parts = sorted((folder / "assignments").glob("part-*.parquet"))
    return np.concatenate([pq.read_table(p, columns=["cluster"])["cluster"].to_numpy()
                           for p in parts])


def run_case(spec: str, workers: list[int], data_dir: Path, seed: int) -> list[dict[str, Any]]:
    import ray

    from s2l_ray.config import ClusterConfig
    from s2l_ray.stages.cluster import fit_files

    n, t, k, iters = (int(float(v)) for v in spec.split(":"))
    t0 = time.perf_counter()
    files = in_subprocess(make_data, data_dir / f"n{n}_t{t}", n, t)
    log.info("case %s: data ready in %.1f s (%d files)", spec, time.perf_counter() - t0,
             len(files))
    ref = in_subprocess(faiss_run, files, k, iters, seed)
    log.info("faiss.Kmeans: %.3f s/iter, peak %.0f MiB", ref["s_per_iter"], ref["peak_rss_mb"])
    rows = [{"case": (n, t, k, iters), "engine": "faiss.Kmeans, 1 process",
             "procs": f"1 x {ref['threads']} threads", "init_s": None,
             "s_per_iter": ref["s_per_iter"], "ratio": 1.0,
             "peak_mb": f"{ref['peak_rss_mb']:.0f}", "data_mb": ref["data_mb"],
             "objective": 1.0, "same": "-"}]
    cpus = ray.cluster_resources()["CPU"]
    first = None
    for w in workers:
        out = data_dir / f"out_n{n}_t{t}_k{k}_w{w}"
        shutil.rmtree(out, ignore_errors=True)
        c = ClusterConfig(k=k, max_iter=iters, tol=0, num_workers=w, cpus_per_worker=cpus / w)
        t0 = time.perf_counter()
        rep = fit_files(files, out, c, seed)
        wall = time.perf_counter() - t0
        labels = labels_in_row_order(out)
        same = "-" if first is None else ("yes" if np.array_equal(labels, first) else "NO")
        first = labels if first is None else first
        per = rep["seconds_per_iteration"]
        log.info("s2l %d workers: %.3f s/iter, init %.1f s, wall %.1f s, actors peak %s MiB",
                 w, per, rep["init_seconds"], wall, rep["actor_peak_rss_mb"])
        rows.append({"case": (n, t, k, iters), "engine": "s2l_ray k-means, local Ray",
                     "procs": f"{w} actor{'s' if w > 1 else ''} x {max(1, int(cpus / w))} "
                              "threads",
                     "init_s": rep["init_seconds"], "s_per_iter": per,
                     "ratio": per / ref["s_per_iter"],
                     "peak_mb": "/".join(f"{m:.0f}" for m in rep["actor_peak_rss_mb"])
                                + f" (driver {rep['driver_peak_rss_mb']:.0f})",
                     "data_mb": n * t * 4 / 2**20 / w,
                     "objective": rep["final_inertia"] / ref["objective"], "same": same})
        shutil.rmtree(out, ignore_errors=True)
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    head = ("| N | T | K | iters | engine | processes | init s | s / iter | vs faiss | "
            "peak RSS per process, MiB | N x T floats per process, MiB | objective / faiss | "
            "labels = 1 worker |")
    lines = [head, "|" + " --- |" * 13]
    for r in rows:
        n, t, k, iters = r["case"]
        init = "-" if r["init_s"] is None else f"{r['init_s']:.1f}"
        lines.append(f"| {n:,} | {t} | {k} | {iters} | {r['engine']} | {r['procs']} | {init} | "
                     f"{r['s_per_iter']:.3f} | {r['ratio']:.2f}x | {r['peak_mb']} | "
                     f"{r['data_mb']:.0f} | {r['objective']:.4f} | {r['same']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cases", nargs="+", default=DEFAULT_CASES, metavar="N:T:K:ITERS")
    p.add_argument("--workers", default="1,2", help="actor counts to compare, e.g. 1,2,4")
    p.add_argument("--data-dir", default="/tmp/s2l_kmeans_bench")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "kmeans_scale_cpu.md"))
    p.add_argument("--keep-data", action="store_true", help="keep the generated Parquet")
    args = p.parse_args(argv)

    import faiss
    import ray

    from s2l_ray.runtime import init_ray, setup_logging

    setup_logging("INFO")
    logging.getLogger("s2l_ray.stages.cluster").setLevel(logging.WARNING)  # per-iteration lines
    log.setLevel(logging.INFO)
    log.addHandler(logging.getLogger("s2l_ray").handlers[0])
    init_ray(num_cpus=os.cpu_count())
    data_dir = Path(args.data_dir)
    rows: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    for spec in args.cases:
        rows += run_case(spec, [int(w) for w in args.workers.split(",")], data_dir, args.seed)
    ray.shutdown()
    if not args.keep_data:
        shutil.rmtree(data_dir, ignore_errors=True)
    mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    text = "\n".join([
        "# k-means scale: s2l_ray distributed k-means vs single-process faiss.Kmeans (CPU)",
        "",
        f"`python benchmarks/kmeans_scale.py {' '.join(argv or sys.argv[1:])}`".replace(
            " `", "`"),
        "",
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"{mem_gib:.0f} GiB; faiss {faiss.__version__}, ray {ray.__version__}, numpy "
        f"{np.__version__}. Total run {time.perf_counter() - t0:.0f} s.",
        "",
        "Both engines fit on ALL N points (faiss's max_points_per_centroid raised), same K, "
        "seed and iterations (tol=0). s / iter: wall time of one Lloyd iteration (for Ray: "
        "broadcast centroids, every actor assigns its shard, reduce). Peak RSS: faiss's process "
        "(holds all N x T floats); each Ray actor (holds its shard only) and the driver (K x T "
        "centroids and the init sample). vs faiss: s / iter relative to faiss.Kmeans. "
        "objective / faiss: final sum of squared distances relative to faiss's (different "
        "initialisations: k-means++ on a hash-picked sample vs faiss's random sample). labels = "
        "1 worker: the labels with w workers are identical to those with 1.",
        "",
        table(rows),
        "",
        "Notes. An idle Ray actor is already ~250 MiB (Python, Ray, pyarrow, faiss); on top an "
        "actor holds its shard's floats, ids and sources, 12 bytes per row of labels and "
        "distances, and 8 bytes per row of id hashes while initialising: its peak roughly "
        "halves with twice the workers, and no process holds all N x T floats but faiss's. The "
        "driver's figure is the benchmark process's lifetime peak (it also compares the label "
        "files). init s: reading the shards, hashing every id (keyed BLAKE2b, ~2 us per id "
        "here) and k-means++ on the sample. This machine is shared: timings move by tens of "
        "percent between runs.",
        "",
    ])
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
