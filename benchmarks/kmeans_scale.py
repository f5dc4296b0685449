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

With --pipeline it measures the whole cluster + select stages instead (`fit_files` then
`select_from`, what the two stages run; select.method=s2l, --budget of the rows, the selected
rows' original text looked up in a synthetic ingest/examples folder), global and per-source
(--modes), against the same work in one process (faiss.Kmeans on all rows, per source with
per-source, then `core.selection.select` in memory): wall time of each step, peak RSS of every
process (the k-means actors, the select tasks, the driver). Results accumulate over runs (same
--data-dir) into benchmarks/results/selection_scale_cpu.md:

    python benchmarks/kmeans_scale.py --pipeline --cases 10000000:10:100:10 --workers 1,2,4 \
        --modes global --keep-data
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


def make_examples(folder: Path, n: int) -> str:
    """The ingest stage's examples folder for make_data's ids (id, raw): what select reads to
    write selected.jsonl. One file per ROWS_PER_FILE rows."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    stamp = folder / "params.json"
    if stamp.is_file() and json.loads(stamp.read_text()) == {"n": n}:
        return str(folder)
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    for f, start in enumerate(range(0, n, ROWS_PER_FILE)):
        rows = range(start, min(start + ROWS_PER_FILE, n))
        pq.write_table(pa.table({
            "id": pa.array([f"{i:012x}" for i in rows], pa.string()),
            "raw": pa.array([f'{{"instruction": "q{i}", "output": "a{i}"}}' for i in rows],
                            pa.string())}), folder / f"part-{f:04d}.parquet")
    stamp.write_text(json.dumps({"n": n}))
    return str(folder)


def faiss_pipeline(files: list[str], k: int, iters: int, seed: int, per_source: bool,
                   budget: float) -> dict[str, Any]:
    """Cluster + select in one process, all in memory: faiss.Kmeans on all rows (within each
    source with per_source, min(k, rows) clusters each, as the official code), the labels by
    its index, then core.selection.select (s2l) on the Python ids. Run in a fresh process."""
    import faiss
    import pyarrow as pa
    import pyarrow.parquet as pq

    from s2l_ray.core.selection import select
    from s2l_ray.stages.cluster import losses_matrix

    t0 = time.perf_counter()
    tables = [pq.read_table(f, columns=["id", "source", "losses"]) for f in files]
    x = np.concatenate([losses_matrix(t["losses"], f) for t, f in zip(tables, files)])
    ids = [i for t in tables for i in t["id"].to_pylist()]
    sources = pa.concat_arrays([c for t in tables for c in t["source"].cast(pa.string()).chunks])
    del tables
    t1 = time.perf_counter()
    labels = np.zeros(len(x), np.int64)
    names = [None] if not per_source else sorted(set(sources.to_pylist()),
                                                key=lambda v: (v is not None, v or ""))
    src = np.asarray(sources.to_pylist(), dtype=object) if per_source else None
    offset = 0
    for name in names:
        rows = np.arange(len(x)) if src is None else np.flatnonzero(src == name)
        part = np.ascontiguousarray(x[rows])
        kp = min(k, len(part))
        km = faiss.Kmeans(x.shape[1], kp, niter=iters, seed=seed,
                          max_points_per_centroid=len(part) // kp + 1, verbose=False)
        km.train(part)
        labels[rows] = km.index.search(part, 1)[1][:, 0] + offset
        offset += kp
    t2 = time.perf_counter()
    chosen = select("s2l", ids, budget, seed, labels=labels,
                    sources=sources.to_pylist() if per_source else None, per_source=per_source)
    t3 = time.perf_counter()
    return {"read_s": t1 - t0, "cluster_s": t2 - t1, "select_s": t3 - t2, "wall_s": t3 - t0,
            "selected": len(chosen), "peak_rss_mb": _peak_mb(),
            "threads": faiss.omp_get_max_threads()}


def pipeline_case(spec: str, workers: list[int], per_source: bool, data_dir: Path, seed: int,
                  budget: float) -> list[dict[str, Any]]:
    """One case and mode: the in-memory pipeline, then the two stages with each actor count."""
    import ray

    from benchmarks.memwatch import PeakRSS
    from s2l_ray.config import ClusterConfig, SelectConfig
    from s2l_ray.stages.cluster import fit_files
    from s2l_ray.stages.select import select_from

    n, t, k, iters = (int(float(v)) for v in spec.split(":"))
    mode = "per-source" if per_source else "global"
    t0 = time.perf_counter()
    files = in_subprocess(make_data, data_dir / f"n{n}_t{t}", n, t)
    examples = in_subprocess(make_examples, data_dir / f"n{n}_examples", n)
    log.info("case %s %s: data ready in %.1f s", spec, mode, time.perf_counter() - t0)
    ref = in_subprocess(faiss_pipeline, files, k, iters, seed, per_source, budget)
    log.info("one process: %s", ref)
    case = {"n": n, "t": t, "k": k, "iters": iters, "mode": mode, "budget": budget}
    rows = [{**case, "engine": "faiss.Kmeans + select(), 1 process",
             "procs": f"1 x {ref['threads']} threads", "read_s": ref["read_s"],
             "cluster_s": ref["cluster_s"], "select_s": ref["select_s"], "wall_s": ref["wall_s"],
             "selected": ref["selected"], "actor_mb": [], "task_mb": None,
             "driver_mb": ref["peak_rss_mb"]}]
    cpus = ray.cluster_resources()["CPU"]
    for w in workers:
        out = data_dir / f"out_{n}_{mode}_w{w}"
        shutil.rmtree(out, ignore_errors=True)
        c = ClusterConfig(k=k, max_iter=iters, tol=0, num_workers=w, cpus_per_worker=cpus / w,
                          per_source=per_source)
        with PeakRSS() as m_cluster:
            t0 = time.perf_counter()
            rep = fit_files(files, out / "cluster", c, seed)
            t1 = time.perf_counter()
        with PeakRSS() as m_select:
            t2 = time.perf_counter()
            sel = select_from(out / "cluster", Path(files[0]).parent, examples, out / "select",
                              SelectConfig(method="s2l", budget=budget), seed)
            t3 = time.perf_counter()
        log.info("%d actors: cluster %.1f s, select %.1f s, actors %s MiB, select tasks %.0f "
                 "MiB, driver %.0f MiB", w, t1 - t0, t3 - t2, rep["actor_peak_rss_mb"],
                 m_select.worker_peak_mb(), max(m_cluster.driver_peak_mb(),
                                                m_select.driver_peak_mb()))
        rows.append({**case, "engine": "cluster + select stages, local Ray",
                     "procs": f"{w} actor{'s' if w > 1 else ''} x {max(1, int(cpus / w))} "
                              f"threads", "read_s": None, "cluster_s": t1 - t0,
                     "select_s": t3 - t2, "wall_s": t3 - t0, "selected": sel["selected"],
                     "actor_mb": rep["actor_peak_rss_mb"], "task_mb": m_select.worker_peak_mb(),
                     "driver_mb": max(m_cluster.driver_peak_mb(), m_select.driver_peak_mb())})
        shutil.rmtree(out, ignore_errors=True)
    return rows


def pipeline_table(rows: list[dict[str, Any]]) -> str:
    lines = ["| N | T | K | iters | mode | engine | processes | cluster s | select s | "
             "wall s | vs 1 process | selected | peak RSS per k-means actor, MiB | "
             "peak RSS of a select task, MiB | driver peak RSS, MiB |", "|" + " --- |" * 15]
    ref: dict[tuple[Any, ...], float] = {}
    for r in rows:
        key = (r["n"], r["t"], r["k"], r["iters"], r["mode"])
        if r["read_s"] is not None:
            ref[key] = r["wall_s"]
    for r in rows:
        key = (r["n"], r["t"], r["k"], r["iters"], r["mode"])
        cluster = (f"{r['cluster_s']:.1f}" if r["read_s"] is None else
                   f"{r['cluster_s']:.1f} (+ read {r['read_s']:.1f})")
        ratio = f"{r['wall_s'] / ref[key]:.2f}x" if key in ref else "-"
        actors = "/".join(f"{m:.0f}" for m in r["actor_mb"]) or "-"
        task = "-" if r["task_mb"] is None else f"{r['task_mb']:.0f}"
        lines.append(f"| {r['n']:,} | {r['t']} | {r['k']} | {r['iters']} | {r['mode']} | "
                     f"{r['engine']} | {r['procs']} | {cluster} | {r['select_s']:.1f} | "
                     f"{r['wall_s']:.1f} | {ratio} | {r['selected']:,} | {actors} | {task} | "
                     f"{r['driver_mb']:.0f} |")
    return "\n".join(lines)


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
    p.add_argument("--pipeline", action="store_true",
                   help="measure the whole cluster + select stages (see the module docstring)")
    p.add_argument("--modes", default="global,per_source",
                   help="with --pipeline: global and/or per_source clustering")
    p.add_argument("--budget", type=float, default=0.1, help="with --pipeline: select.budget")
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
    workers = [int(w) for w in args.workers.split(",")]
    if args.pipeline:
        return pipeline_main(args, argv, workers, data_dir)
    for spec in args.cases:
        rows += run_case(spec, workers, data_dir, args.seed)
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


def pipeline_main(args: Any, argv: list[str] | None, workers: list[int], data_dir: Path) -> int:
    """--pipeline: every case x mode, merged into the results of earlier runs (same data
    dir) so that long cases can run one per invocation."""
    import faiss
    import ray

    saved = data_dir / "pipeline_results.json"
    rows = json.loads(saved.read_text()) if saved.is_file() else []
    t0 = time.perf_counter()
    for spec in args.cases:
        for mode in args.modes.split(","):
            new = pipeline_case(spec, workers, mode == "per_source", data_dir, args.seed,
                                args.budget)
            done = {(r["n"], r["t"], r["k"], r["iters"], r["mode"]) for r in new}
            rows = [r for r in rows if (r["n"], r["t"], r["k"], r["iters"], r["mode"])
                    not in done] + new
            saved.write_text(json.dumps(rows, indent=1))
    ray.shutdown()
    if not args.keep_data:
        for p in data_dir.glob("n*"):
            shutil.rmtree(p, ignore_errors=True)
    mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    out = Path(args.out)
    if out.name == "kmeans_scale_cpu.md":
        out = out.with_name("selection_scale_cpu.md")
    text = "\n".join([
        "# Selection at scale: the cluster + select stages vs one process (CPU)", "",
        f"Last run: `python benchmarks/kmeans_scale.py {' '.join(argv or sys.argv[1:])}` "
        f"({time.perf_counter() - t0:.0f} s); rows from earlier runs of other cases/modes are "
        "kept.", "",
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"{mem_gib:.0f} GiB; faiss {faiss.__version__}, ray {ray.__version__}, numpy "
        f"{np.__version__}. Local Ray with every core; the one-process baseline runs in its "
        "own process.", "",
        "Data: N synthetic trajectories (T losses around 64 seeded curves, 5 sources, Parquet "
        "files of 1M rows) and an examples folder (id, raw). Both engines: s2l with "
        "select.budget of the rows, K clusters (per source: K per source, min(K, rows)), the "
        "same iterations with tol=0 on ALL rows. One process: faiss.Kmeans + index search for "
        "the labels, then `core.selection.select` on the Python ids, all in memory (cluster s "
        "excludes reading, shown apart; wall s includes it). Stages: `fit_files` (reading its "
        "shard is part of each actor's start, so of cluster s) then `select_from` (counts, "
        "per-file candidates, the ranking, and selected.parquet + selected.jsonl written with "
        "the rows' text: work the baseline does not do). Peak RSS: the k-means actors' own "
        "ru_maxrss; select tasks and the driver sampled every 0.1 s (the driver's during the "
        "two stages only).", "",
        pipeline_table(rows), "",
    ])
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
