"""s2l_ray.core.kmeans: the pure, seeded k-means math (no Ray; milliseconds to a second)."""

from __future__ import annotations

import faiss
import numpy as np
import pytest

from s2l_ray.config import ConfigError
from s2l_ray.core import kmeans as km
from s2l_ray.errors import ParamError, config_keys


def blobs(n: int = 3000, t: int = 10, centers: int = 12, seed: int = 0,
          spread: float = 0.3) -> np.ndarray:
    """n x t float32 loss-like trajectories around `centers` seeded means."""
    rng = np.random.default_rng(seed)
    means = rng.uniform(0.5, 4.0, (centers, t))
    return (means[rng.integers(0, centers, n)] + rng.normal(0, spread, (n, t))).astype(np.float32)


def ids_for(n: int) -> list[str]:
    return [f"ex{i:06d}" for i in range(n)]


@pytest.mark.parametrize(("t", "k"), [(8, 7), (20, 300), (40, 50)])
def test_nearest_gives_each_row_the_same_bits_anywhere(t: int, k: int) -> None:
    # faiss switches kernels with the batch size; `nearest` must not let that leak into labels
    rng = np.random.default_rng(1)
    n = 70_000 if t <= km.FUSED_MAX_DIM else 6_000  # > SEARCH_ROWS: a full block + a padded one
    x = rng.normal(2, 1, (n, t)).astype(np.float32)
    c = rng.normal(2, 1, (k, t)).astype(np.float32)
    dist, lab = km.nearest(x, c)
    for rows in (rng.permutation(n), rng.permutation(n)[:777], np.arange(3, n)):
        d2, l2 = km.nearest(x[rows], c)
        assert np.array_equal(d2, dist[rows]) and np.array_equal(l2, lab[rows])
    exact = ((x[:500, None, :].astype(np.float64) - c[None]) ** 2).sum(-1)
    assert np.array_equal(exact.argmin(1), lab[:500])


def test_assign_stats_matches_brute_force() -> None:
    rng = np.random.default_rng(2)
    x = rng.normal(0, 1, (500, 6)).astype(np.float32)
    c = rng.normal(0, 1, (9, 6)).astype(np.float32)
    sums, counts, inertia = km.assign_stats(x, c)
    d = ((x[:, None, :].astype(np.float64) - c[None]) ** 2).sum(-1)
    lab = d.argmin(1)
    want = np.zeros((9, 6))
    np.add.at(want, lab, x.astype(np.float64))
    assert np.array_equal(counts, np.bincount(lab, minlength=9))
    np.testing.assert_allclose(sums, want, rtol=1e-12, atol=1e-12)
    assert inertia == pytest.approx(d.min(1).sum(), rel=1e-5)


def test_sharded_sums_on_the_grid_are_exact_in_any_order() -> None:
    rng = np.random.default_rng(3)
    x = (rng.lognormal(0, 1, (4000, 5)) * rng.choice([1e-3, 1.0, 30.0], (4000, 1))
         ).astype(np.float32)
    c = x[:13]
    grid = km.exact_grid(len(x), float(np.abs(x).max()), x.shape[1])
    whole = km.assign_stats(x, c, grid=grid)
    for _ in range(3):
        perm = rng.permutation(len(x))
        cuts = np.sort(rng.choice(np.arange(1, len(x)), 4, replace=False))
        parts = [km.assign_stats(x[p], c, grid=grid) for p in np.split(perm, cuts)]
        assert np.array_equal(sum(p[0] for p in reversed(parts)), whole[0])  # bit for bit
        assert np.array_equal(sum(p[1] for p in parts), whole[1])
        assert sum(p[2] for p in reversed(parts)) == whole[2]


def test_update_splits_every_empty_cluster() -> None:
    sums = np.array([[10.0, 10.0], [0.0, 0.0], [3.0, 6.0], [0.0, 0.0]])
    counts = np.array([10, 0, 3, 0])
    cent, nsplit = km.update_centroids(sums, counts, np.random.RandomState(0))
    assert nsplit == 2
    assert len({tuple(r) for r in cent.round(9)}) == 4  # no two centroids alike, none at 0
    assert not (cent == 0).all(axis=1).any()


def test_fit_reaches_faiss_objective_on_all_points() -> None:
    x = blobs(4000, 10, 16, seed=4)
    k, iters, seed = 16, 15, 123
    mine = km.fit(ids_for(len(x)), x, k, seed=seed, max_iter=iters, tol=0)
    ref = faiss.Kmeans(x.shape[1], k, niter=iters, seed=seed, max_points_per_centroid=len(x))
    ref.train(x)  # max_points_per_centroid = n: faiss fits on all points too, like the engine
    assert km.objective(x, mine.result.centroids) <= 1.02 * km.objective(x, ref.centroids)


def test_lloyd_from_faiss_init_tracks_faiss() -> None:
    # the same start and iterations: the same Lloyd algorithm, up to float rounding
    x = blobs(3000, 8, 10, seed=5, spread=0.6)
    rng = np.random.default_rng(0)
    start = x[rng.choice(len(x), 10, replace=False)]
    ref = faiss.Kmeans(8, 10, niter=12, seed=1, max_points_per_centroid=len(x))
    ref.train(x, init_centroids=start)
    c, hist, _ = km.lloyd(lambda c: km.assign_stats(x, c), start, max_iter=12, tol=0, seed=1)
    assert len(hist) == 12
    assert km.objective(x, c) == pytest.approx(km.objective(x, ref.centroids), rel=1e-4)
    assert [h["inertia"] for h in hist] == pytest.approx(list(ref.obj), rel=1e-4)


def test_labels_do_not_depend_on_shards_or_row_order() -> None:
    x = blobs(3000, 12, 20, seed=6, spread=0.8)
    ids = ids_for(len(x))
    a = km.fit(ids, x, 20, seed=7, max_iter=10, tol=0)
    perm = np.random.default_rng(0).permutation(len(x))
    b = km.fit([ids[i] for i in perm], x[perm], 20, seed=7, max_iter=10, tol=0, n_shards=5)
    assert np.array_equal(a.labels[perm], b.labels)
    assert np.array_equal(a.distances[perm], b.distances)
    assert np.array_equal(a.result.centroids, b.result.centroids)
    assert [h["inertia"] for h in a.result.history] == [h["inertia"] for h in b.result.history]
    c = km.fit(ids, x, 20, seed=8, max_iter=10, tol=0)
    assert not np.array_equal(a.result.centroids, c.result.centroids)  # the seed matters


@pytest.mark.parametrize("init", ["kmeans++", "random"])
def test_duplicates_and_more_clusters_than_distinct_rows(init: str) -> None:
    rows = np.array([[1, 2, 3], [3, 2, 1], [2, 2, 2]], np.float32)
    x = np.repeat(rows, 50, axis=0)
    f = km.fit(ids_for(len(x)), x, 5, seed=0, max_iter=8, init=init)
    assert f.labels.min() >= 0 and f.labels.max() < 5
    assert np.isfinite(f.result.centroids).all()
    assert km.objective(x, f.result.centroids) == pytest.approx(0.0, abs=1e-6)
    # every copy of a row lands in the same cluster
    assert all(len(set(f.labels[i * 50:(i + 1) * 50])) == 1 for i in range(3))


def test_empty_clusters_are_split_during_fit() -> None:
    # two far blobs, k=4; one start far from all data: its cluster is empty and gets split
    rng = np.random.default_rng(9)
    x = np.vstack([rng.normal(0, 0.1, (300, 4)), rng.normal(50, 0.1, (300, 4))]
                  ).astype(np.float32)
    start = np.vstack([x[:2], x[300:301], np.full((1, 4), 1e3)]).astype(np.float32)
    c, hist, _ = km.lloyd(lambda c: km.assign_stats(x, c), start, max_iter=10, tol=0, seed=0)
    assert sum(h["splits"] for h in hist) >= 1
    _, lab = km.nearest(x, c)
    assert len(np.unique(lab)) == 4


def test_tolerance_stops_early() -> None:
    x = blobs(2000, 6, 5, seed=10, spread=0.05)
    f = km.fit(ids_for(len(x)), x, 5, seed=0, max_iter=50, tol=1e-3)
    assert f.result.converged and len(f.result.history) < 50


def test_standardize_is_per_example() -> None:
    rng = np.random.default_rng(11)
    x = rng.uniform(0.5, 5, (100, 9)).astype(np.float32)
    z = km.features(x, "standardize")
    np.testing.assert_allclose(z.mean(1), 0, atol=1e-5)
    np.testing.assert_allclose(z.std(1), 1, atol=1e-4)
    np.testing.assert_allclose(km.features(3 * x + 7, "standardize"), z, atol=1e-4)
    flat = km.features(np.full((2, 9), 2.5, np.float32), "standardize")
    assert (flat == 0).all()
    assert np.array_equal(km.features(x[10:20], "standardize"), z[10:20])  # row-local bits


def test_non_finite_losses_name_the_example() -> None:
    x = blobs(10, 4)
    x[3, 2] = np.nan
    with pytest.raises(ValueError, match=r"ex000003.*Fix"):
        km.features(x, "none", ids_for(10))


def test_more_clusters_than_examples_is_a_config_error() -> None:
    with pytest.raises(ParamError, match=r"^k: 6 clusters for 5 examples.*Fix"):
        km.fit(ids_for(5), blobs(5, 3), 6, seed=0)
    with pytest.raises(ConfigError, match=r"'cluster\.k'.*Fix: use at most 5"), \
            config_keys("cluster"):
        km.fit(ids_for(5), blobs(5, 3), 6, seed=0)


def test_init_is_seeded_and_uses_sample_rows() -> None:
    s = blobs(400, 5, 8, seed=12)
    a = km.kmeans_plus_plus(s, 8, seed=3)
    assert np.array_equal(a, km.kmeans_plus_plus(s, 8, seed=3))
    assert not np.array_equal(a, km.kmeans_plus_plus(s, 8, seed=4))
    assert all((s == r.astype(np.float32)).all(1).any() for r in a)
    r = km.init_centroids(s, 8, 3, "random")
    assert len({tuple(v) for v in r}) == 8


def test_sample_is_the_smallest_hashes_wherever_rows_are() -> None:
    ids = ids_for(1000)
    h = km.hash_ids(ids, 5, km.INIT_SALT)
    whole = [ids[i] for i in km.smallest_by_hash(h, ids, 50)]
    parts = []
    for a, b in ((0, 400), (400, 1000)):
        keep = km.smallest_by_hash(h[a:b], ids[a:b], 50)
        parts += [(h[a + i], ids[a + i]) for i in keep]
    hs = np.array([p[0] for p in parts], np.uint64)
    merged = [parts[i][1] for i in km.smallest_by_hash(hs, [p[1] for p in parts], 50)]
    assert merged == whole
