"""Per-source k-means, the training subsample and NaN losses (the official code's faiss
settings), in-process: the same labels whatever the shards and the row order. No Ray."""

from __future__ import annotations

import numpy as np
import pytest

from s2l_ray.core import kmeans as km


def _data(n: int = 1200, t: int = 6, seed: int = 0):
    rng = np.random.default_rng(seed)
    means = np.sort(rng.uniform(0.3, 4.0, (9, t)), axis=1)[:, ::-1]
    x = (means[rng.integers(0, 9, n)] + rng.normal(0, 0.2, (n, t))).astype(np.float32)
    ids = [f"{rng.integers(1 << 62):016x}-{i}" for i in range(n)]
    parts = rng.choice(4, n, p=[0.6, 0.3, 0.095, 0.005])  # part 3: a handful of rows
    return ids, x, parts


def _by_id(ids, fit):
    return dict(zip(ids, zip(fit.labels.tolist(), fit.distances.tolist())))


@pytest.mark.parametrize("train_sample", [None, 8])
def test_per_part_labels_do_not_depend_on_shards_or_order(train_sample):
    ids, x, parts = _data()
    kw = {"seed": 3, "max_iter": 8, "tol": 0, "parts": parts,
          "train_sample_per_centroid": train_sample}
    one = km.fit(ids, x, 10, n_shards=1, **kw)
    perm = np.random.default_rng(1).permutation(len(ids))
    many = km.fit([ids[i] for i in perm], x[perm], 10, n_shards=3,
                  **{**kw, "parts": parts[perm]})
    assert _by_id(ids, one) == _by_id([ids[i] for i in perm], many)
    assert np.array_equal(one.centroids, many.centroids)


def test_clusters_stay_inside_their_part_numbered_part_after_part():
    ids, x, parts = _data()
    f = km.fit(ids, x, 10, seed=0, max_iter=5, parts=parts)
    n3 = int((parts == 3).sum())
    assert 0 < n3 < 10  # the tiny part gets min(k, rows) clusters
    assert len(f.centroids) == 30 + n3
    for p in range(4):
        lo = 10 * p
        hi = lo + (10 if p < 3 else n3)
        assert set(f.labels[parts == p].tolist()) <= set(range(lo, hi))
    # each part on its own gives the same clusters (shifted by the part's offset)
    alone = km.fit([i for i, p in zip(ids, parts) if p == 1], x[parts == 1], 10, seed=0,
                   max_iter=5)
    assert np.array_equal(alone.labels + 10, f.labels[parts == 1])


def test_training_sample_is_used_and_every_row_labelled():
    ids, x, _ = _data()
    full = km.fit(ids, x, 10, seed=0, max_iter=5, tol=0)
    sub = km.fit(ids, x, 10, seed=0, max_iter=5, tol=0, train_sample_per_centroid=8)
    assert full.result.trained_on is None and sub.result.trained_on == 80
    assert sub.result.n == len(ids) and len(sub.labels) == len(ids)
    assert not np.array_equal(full.centroids, sub.centroids)
    # a sample at least as large as the data is the data
    same = km.fit(ids, x, 10, seed=0, max_iter=5, tol=0, train_sample_per_centroid=200)
    assert np.array_equal(same.labels, full.labels)


def test_nan_losses_zero_or_error():
    x = np.array([[1.0, np.nan, 0.5], [2.0, 1.0, 0.5]], np.float32)
    with pytest.raises(ValueError, match="NaN"):
        km.features(x, ids=["a", "b"])
    z = km.features(x, nan="zero")
    assert z[0].tolist() == [1.0, 0.0, 0.5] and z[1].tolist() == [2.0, 1.0, 0.5]
    with pytest.raises(ValueError, match="NaN"):  # infinities are never silently changed
        km.features(np.array([[np.inf, 1.0]], np.float32), nan="zero")
