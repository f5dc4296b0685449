"""The official S2L rules through the real stages (local Ray): per-source k-means, tiny
clusters pooled, the noise cap and source_balanced give the same selection whatever the workers
and the Parquet layout, and the one the pure `selection.select` gives."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from s2l_ray.config import ClusterConfig, SelectConfig
from s2l_ray.core import kmeans as km
from s2l_ray.core import selection
from s2l_ray.stages.cluster import fit_files
from s2l_ray.stages.select import select_from
from tests.stages.test_cluster import labels_by_id, synthetic, write_examples, write_trajectories

pytestmark = pytest.mark.ray

N, K, SEED = 1500, 8, 11


@pytest.fixture(scope="module")
def data() -> dict:
    d = synthetic(n=N, t=6, seed=3)
    rng = np.random.default_rng(0)
    d["sources"] = rng.choice(["big", "mid", "small", None], N, p=[0.7, 0.2, 0.08, 0.02]).tolist()
    d["x"][5, 2] = np.nan  # a prompt too long: NaN, set to 0 by nan_losses=zero
    # 20 never-learned rows: high loss that does not fall
    d["x"][-150:-130] = np.linspace(4.5, 4.4, 6, dtype=np.float32)
    return d


@pytest.fixture(scope="module")
def runs(ray_local, data, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("persource")
    write_examples(data, root / "examples")
    perm = np.random.default_rng(9).permutation(N)
    out = {"examples": root / "examples"}
    for workers, (files, rg, order) in {1: (1, 400, None), 3: (3, 211, perm)}.items():
        traj = root / f"traj{workers}"
        paths = write_trajectories(data, traj, files, rg, order)
        c = ClusterConfig(k=K, max_iter=10, tol=0, num_workers=workers, per_source=True,
                          nan_losses="zero", init="random", train_sample_per_centroid=40)
        rep = fit_files(paths, root / f"cl{workers}", c, SEED)
        out[workers] = {"report": rep, "dir": root / f"cl{workers}", "traj": traj}
    return out


def test_per_source_clusters_match_the_pure_engine(runs, data):
    first = labels_by_id(runs[1]["dir"])
    assert labels_by_id(runs[3]["dir"]) == first
    rep = runs[1]["report"]
    assert rep["per_source"] and rep["sources"] == [None, "big", "mid", "small"]
    _, parts = selection.source_groups(data["sources"])
    ref = km.fit(data["ids"], data["x"], K, seed=SEED, max_iter=10, tol=0, init="random",
                 parts=parts, train_sample_per_centroid=40, nan="zero")
    assert [first[i][0] for i in data["ids"]] == ref.labels.tolist()
    stats = json.loads((runs[1]["dir"] / "clusters.json").read_text())
    assert stats == json.loads((runs[3]["dir"] / "clusters.json").read_text())
    assert len(stats["sizes"]) == rep["clusters"] == 4 * K
    for c, src in enumerate(stats["source"]):  # every cluster inside one source
        assert {data["sources"][i] for i in np.flatnonzero(ref.labels == c)} <= {src}


@pytest.mark.parametrize("method,opts", [
    ("s2l", {"tiny_cluster_size": 2}),
    ("s2l", {"tiny_cluster_size": 2, "noise_cap": True}),
    ("source_balanced", {}),
])
def test_same_selection_whatever_the_workers_and_pure(runs, data, method, opts):
    got = {}
    for w in (1, 3):
        out = runs[w]["dir"] / f"sel_{method}_{len(opts)}"
        rep = select_from(runs[w]["dir"], runs[w]["traj"], runs["examples"], out,
                          SelectConfig(method=method, budget=0.2, **opts), SEED)
        got[w] = pq.read_table(out / "selected.parquet").to_pylist()
        assert rep["selected"] == 300
    assert got[1] == got[3]
    lab = labels_by_id(runs[1]["dir"])
    want = selection.select(
        method, data["ids"], 0.2, SEED, labels=np.array([lab[i][0] for i in data["ids"]]),
        sources=data["sources"], losses=np.nan_to_num(data["x"]), per_source=True,
        tiny=opts.get("tiny_cluster_size", 0),
        noise_drop_ratio=0.5 if opts.get("noise_cap") else None)
    assert [r["id"] for r in got[1]] == want
    chosen = [r["source"] for r in got[1]]
    names = [None, "big", "mid", "small"]
    sizes = [sum(s == x for s in data["sources"]) for x in names]
    assert [sum(c == x for c in chosen) for x in names] == selection.s2l_quotas(
        sizes, 300).tolist()  # the budget split over the sources, smallest first


def test_noise_cap_keeps_never_learned_rows_at_base_rate(runs, data):
    bad = set(data["ids"][-150:-130])
    counts = {}
    for cap in (False, True):
        out = runs[1]["dir"] / f"noise_{cap}"
        rep = select_from(runs[1]["dir"], runs[1]["traj"], runs["examples"], out,
                          SelectConfig(method="s2l", budget=0.2, noise_cap=cap), SEED)
        ids = pq.read_table(out / "selected.parquet")["id"].to_pylist()
        counts[cap] = sum(i in bad for i in ids)
    assert rep["noise_capped_clusters"]  # the never-learned rows' cluster is flagged
    assert counts[True] <= 0.2 * 20 < counts[False]
