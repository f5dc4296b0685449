"""Stages `cluster` and `select` on a real local Ray, over synthetic trajectory Parquet files."""

from __future__ import annotations

import json
from pathlib import Path

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from s2l_ray.config import ClusterConfig, SelectConfig, load_config
from s2l_ray.core import kmeans as km
from s2l_ray.core import selection as selection
from s2l_ray.stages.cluster import fit_files, parquet_files, plan_shards
from s2l_ray.stages.select import select_from

pytestmark = pytest.mark.ray

N, T, K, SEED = 3000, 10, 12, 42


def synthetic(n: int = N, t: int = T, centers: int = 16, seed: int = 0) -> dict:
    """Loss-like trajectories around seeded centres, 100 exact duplicates of one row included."""
    rng = np.random.default_rng(seed)
    means = np.sort(rng.uniform(0.3, 4.0, (centers, t)), axis=1)[:, ::-1]
    x = (means[rng.integers(0, centers, n)] + rng.normal(0, 0.25, (n, t))).astype(np.float32)
    x[-100:] = x[0]
    ids = [f"{rng.integers(1 << 62):016x}-{i}" for i in range(n)]
    return {"ids": ids, "x": x, "sources": [f"src{i % 4}" if i % 9 else None for i in range(n)]}


def write_trajectories(d: dict, folder: Path, files: int, row_group: int,
                       order: np.ndarray | None = None) -> list[str]:
    """The trajectories contract: id, source, n_response_tokens, losses (fixed-size list)."""
    folder.mkdir(parents=True, exist_ok=True)
    o = np.arange(len(d["ids"])) if order is None else order
    for f, rows in enumerate(np.array_split(o, files)):
        x = d["x"][rows]
        pq.write_table(pa.table({
            "id": [d["ids"][i] for i in rows], "source": [d["sources"][i] for i in rows],
            "n_response_tokens": pa.array(np.full(len(rows), 7), pa.int32()),
            "losses": pa.FixedSizeListArray.from_arrays(pa.array(x.ravel()), x.shape[1]),
        }), folder / f"part-{f:03d}.parquet", row_group_size=row_group)
    (folder / "manifest.json").write_text("[]")
    return parquet_files(folder)


def write_examples(d: dict, folder: Path) -> None:
    """ingest/examples: id, source, raw (the original row as JSON)."""
    folder.mkdir(parents=True, exist_ok=True)
    raw = [json.dumps({"instruction": f"question {i}", "output": f"answer {i}", "n": i})
           for i in range(len(d["ids"]))]
    half = len(raw) // 2
    for f, sl in enumerate((slice(0, half), slice(half, None))):
        pq.write_table(pa.table({"id": d["ids"][sl], "source": d["sources"][sl], "raw": raw[sl]}),
                       folder / f"{f}.parquet", row_group_size=700)


def labels_by_id(out: Path) -> dict:
    t = pa.concat_tables(pq.read_table(f) for f in parquet_files(out / "assignments"))
    return dict(zip(t["id"].to_pylist(), zip(t["cluster"].to_pylist(),
                                              t["distance"].to_pylist())))


@pytest.fixture(scope="module")
def data() -> dict:
    return synthetic()


@pytest.fixture(scope="module")
def runs(ray_local, data, tmp_path_factory) -> dict:
    """The same data in three Parquet layouts, clustered with 1, 2 and 4 workers."""
    root = tmp_path_factory.mktemp("cluster")
    perm = np.random.default_rng(5).permutation(N)
    layouts = {1: (1, 500, None), 2: (3, 333, perm), 4: (2, 1000, perm[::-1])}
    write_examples(data, root / "examples")
    out = {}
    for workers, (files, rg, order) in layouts.items():
        traj = root / f"traj{workers}"
        paths = write_trajectories(data, traj, files, rg, order)
        c = ClusterConfig(k=K, max_iter=15, tol=0, num_workers=workers)
        rep = fit_files(paths, root / f"cl{workers}", c, SEED)
        out[workers] = {"report": rep, "dir": root / f"cl{workers}", "traj": traj}
    out["examples"] = root / "examples"
    return out


def test_shard_plan_covers_every_row_once(tmp_path, data) -> None:
    paths = write_trajectories(data, tmp_path / "t", 3, 333)
    for w in (1, 2, 4, 7):
        plan = plan_shards(paths, w)
        assert len(plan) == w
        sizes = [sum(p.stop - p.start for p in s) for s in plan]
        assert sum(sizes) == N and max(sizes) - min(sizes) <= 1
    assert len(plan_shards(paths[:1], 5000)) == N // 3  # no more shards than rows


def test_same_labels_whatever_the_workers_and_layout(runs, data) -> None:
    first = labels_by_id(runs[1]["dir"])
    assert len(first) == N
    for w in (2, 4):
        assert labels_by_id(runs[w]["dir"]) == first  # cluster AND distance, bit for bit
        assert np.array_equal(np.load(runs[w]["dir"] / "centroids.npy"),
                              np.load(runs[1]["dir"] / "centroids.npy"))
    assert runs[4]["report"]["workers"] == 4 and runs[4]["report"]["shard_rows"] == [750] * 4
    # ... and the same as the in-process engine on one array
    ref = km.fit(data["ids"], data["x"], K, seed=SEED, max_iter=15, tol=0)
    assert [first[i][0] for i in data["ids"]] == ref.labels.tolist()


def test_objective_within_2_percent_of_faiss(runs, data) -> None:
    rep = runs[1]["report"]
    assert rep["iterations"] == 15 and rep["examples"] == N and rep["fit_on"].startswith("all")
    # faiss.Kmeans trains on at most 256 points per centroid unless told otherwise: use all
    ref = faiss.Kmeans(T, K, niter=15, seed=SEED, max_points_per_centroid=N)
    ref.train(data["x"])
    faiss_obj = km.objective(data["x"], ref.centroids)
    assert rep["final_inertia"] <= 1.02 * faiss_obj
    assert rep["final_inertia"] == pytest.approx(km.objective(
        data["x"], np.load(runs[1]["dir"] / "centroids.npy")), rel=1e-5)
    stats = json.loads((runs[1]["dir"] / "iterations.json").read_text())
    assert len(stats) == 15 and all(s["imbalance"] >= 1 for s in stats)
    assert sum(rep["cluster_sizes"]) == N and len(rep["cluster_sizes"]) == K
    dup = labels_by_id(runs[1]["dir"])
    assert len({dup[i][0] for i in data["ids"][-100:] + data["ids"][:1]}) == 1  # duplicates


@pytest.mark.parametrize("method", ["s2l", "stratified", "middle_perplexity"])
def test_same_selection_whatever_the_workers(runs, data, method) -> None:
    got = {}
    for w in (1, 2, 4):
        out = runs[w]["dir"] / f"sel_{method}"
        rep = select_from(runs[w]["dir"], runs[w]["traj"], runs["examples"], out,
                          SelectConfig(method=method, budget=0.1), SEED)
        got[w] = pq.read_table(out / "selected.parquet").to_pylist()
        assert rep["selected"] == 300 and sum(rep["clusters"]["after"]) == 300
        assert sum(rep["sources"]["after"].values()) == 300
        assert rep["sources"]["before"]["(none)"] == sum(s is None for s in data["sources"])
    assert got[1] == got[2] == got[4]
    ids = [r["id"] for r in got[1]]
    lab = labels_by_id(runs[1]["dir"])
    assert [r["cluster"] for r in got[1]] == [lab[i][0] for i in ids]
    want = selection.select(method, data["ids"], 0.1, SEED,
                            labels=np.array([lab[i][0] for i in data["ids"]]),
                            sources=data["sources"], losses=data["x"])
    assert ids == want  # the distributed selection is the pure one
    lines = (runs[1]["dir"] / f"sel_{method}" / "selected.jsonl").read_text().splitlines()
    n_of = {i: k for k, i in enumerate(data["ids"])}
    assert [json.loads(line)["n"] for line in lines] == [n_of[i] for i in ids]


def test_many_duplicates_and_empty_clusters_survive(ray_local, tmp_path) -> None:
    rows = np.array([[3, 2, 1], [1, 1, 1], [2, 3, 4], [0.5, 0.4, 0.3]], np.float32)
    d = {"ids": [f"d{i}" for i in range(400)], "x": np.repeat(rows, 100, axis=0),
         "sources": [None] * 400}
    paths = write_trajectories(d, tmp_path / "t", 2, 64)
    rep = fit_files(paths, tmp_path / "cl", ClusterConfig(k=6, max_iter=6, num_workers=2), 1)
    assert rep["final_inertia"] == pytest.approx(0, abs=1e-6)
    assert sum(rep["cluster_sizes"]) == 400 and len(rep["cluster_sizes"]) == 6
    assert set(c for c, _ in labels_by_id(tmp_path / "cl").values()) <= set(range(6))


def test_run_select_publishes_both_stages(ray_local, data, tmp_path) -> None:
    """The runner on published upstream folders: `s2l select` with ingest, train-ref and
    trajectories already published runs cluster and select only, and a rerun skips both."""
    from s2l_ray.stages import registry

    cfg = load_config(None, [f"run.output_dir={tmp_path / 'out'}", "cluster.k=8",
                             "cluster.max_iter=5", "cluster.normalize=standardize",
                             "select.budget=50", "select.method=s2l"])
    upstream = registry.stages(cfg, "select")
    for name, fill in (("ingest", lambda d: write_examples(data, d / "examples")),
                       ("train-ref", lambda d: None),
                       ("trajectories", lambda d: write_trajectories(data, d, 2, 800))):
        st = upstream[name]
        fill(st.begin())
        st.publish({"examples": N})
    stage = registry.run_stage(cfg, "select")
    rep = stage.report()
    assert (stage.path / "_SUCCESS.json").is_file() and rep["selected"] == 50
    assert len((stage.path / "selected.jsonl").read_text().splitlines()) == 50
    cl = json.loads((tmp_path / "out" / "cluster" / "report.json").read_text())
    assert cl["normalize"] == "standardize" and cl["k"] == 8
    again = registry.run(cfg, "select")  # second run: every stage skipped
    assert again["select"].report()["seconds"] == rep["seconds"]
    assert again["cluster"].report()["seconds"] == cl["seconds"]
