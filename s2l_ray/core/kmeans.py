"""Seeded k-means math for the cluster stage: pure numpy + faiss, no Ray.

The Lloyd loop follows faiss's own (`faiss.contrib.clustering.kmeans`, the Python twin of the C++
`faiss::Clustering`): assign every vector to its nearest centroid with a flat L2 index, move each
centroid to the mean of its vectors, split a populated cluster for every empty one
(`reassign_centroids`, reused from faiss). What differs is that the data lives in shards
(`Shard`): each shard returns only per-cluster sums (K x T), counts (K) and its inertia, and the
driver reduces them. The distributed stage (`s2l_ray.stages.cluster`) runs `fit_shards`, shards held
by Ray actors; `fit` runs the very same code on in-process shards.

The engine fits on ALL examples, every iteration (faiss.Kmeans by default trains on a subsample of
256 points per centroid); only the initialisation uses a sample. The result is the same whatever
the number of shards, their sizes and the row order, because
  1. the initialisation sample is the m examples with the smallest hash of (seed, id), sorted by
     that hash, so it does not depend on where the rows are;
  2. faiss is always called on blocks of the same shape (`nearest`): faiss switches kernels with
     the batch size (below nx*d = `distance_compute_blas_threshold` it computes one pair at a
     time, above it uses a BLAS/fused kernel), and the kernels round differently in the last bit,
     which flips the label of near-tied examples (about 1 in 10^6 per iteration, measured);
  3. sums and inertia are accumulated on a fixed-point grid (`exact_grid`): every value is a
     multiple of a power of two small enough that no float64 addition rounds, so the driver's
     reduce gives the same bits in any order.
Labels are then identical for 1 or 100 workers on the same kind of CPU (tested); a GPU, another
CPU family or another faiss build may round differently.
"""

from __future__ import annotations

import contextlib
import io
import itertools
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import numpy as np

from s2l_ray.core.hashing import hash_ids
from s2l_ray.errors import ParamError

log = logging.getLogger(__name__)

SEARCH_ROWS = 65536  # rows per faiss call: every call has this shape (the last one is padded)
FUSED_MAX_DIM = 32  # up to this dim faiss's top-1 kernel gives a row the same bits anywhere in
# the block (tested); above it the BLAS kernel's last bit depends on the row's place in its
# 4096-row tile, so there we use the one-pair-at-a-time kernel (slower, exact per row)
INIT_SALT = "kmeans-init"


# ---------------------------------------------------------------------------------------------
# features


def features(losses: np.ndarray, normalize: Literal["none", "standardize"] = "none",
             ids: Sequence[str] | None = None) -> np.ndarray:
    """Trajectories (n, T) -> float32 features (n, T): raw, or each row z-scored on its own.

    Standardising removes each example's loss level and scale, so clusters group the SHAPE of
    the trajectory (when it is learned), not how hard the example is. A flat row becomes zeros.
    Every row is computed from itself alone, so sharding cannot change it.
    """
    x = np.asarray(losses)
    if x.ndim != 2 or x.shape[1] < 1:
        raise ValueError(f"trajectories must be a 2-D (n, T) array, got shape {x.shape}")
    x = np.ascontiguousarray(x, dtype=np.float32)
    bad = ~np.isfinite(x).all(axis=1)
    if bad.any():
        where = np.flatnonzero(bad)[:3]
        shown = [ids[i] for i in where] if ids is not None else where.tolist()
        raise ValueError(f"{int(bad.sum())} trajectories hold NaN or infinite losses (e.g. "
                         f"{shown}); k-means needs finite values. Fix: rerun the trajectories "
                         f"stage, or drop those examples at ingest")
    if normalize == "none":
        return x
    if normalize != "standardize":
        raise ParamError("normalize", f"unknown '{normalize}'", "use 'none' or 'standardize'")
    out = np.empty_like(x)
    t = x.shape[1]
    for i in range(0, len(x), SEARCH_ROWS):  # row blocks bound the float64 temporaries
        b = x[i:i + SEARCH_ROWS].astype(np.float64)  # (rows, T)
        mean = sum(b[:, j] for j in range(t)) / t  # column by column: the same bits per row
        dev = b - mean[:, None]
        std = np.sqrt(sum(dev[:, j] * dev[:, j] for j in range(t)) / t)
        flat = std <= 1e-12
        scale = np.where(flat, 1.0, std)[:, None]
        out[i:i + SEARCH_ROWS] = np.where(flat[:, None], 0.0, dev / scale)
    return out


# ---------------------------------------------------------------------------------------------
# the per-shard step


@dataclass(frozen=True)
class ExactGrid:
    """Powers of two that values (`value`) and squared distances (`dist`) are rounded to."""

    value: float
    dist: float


def _grid_step(total: float) -> float:
    """The finest power of two q with total < 2^52 q (so sums of multiples of q are exact)."""
    if not math.isfinite(total) or total <= 0:
        return 2.0 ** -60
    return 2.0 ** max(math.ceil(math.log2(total)) - 52, -60)


def exact_grid(n: int, max_abs: float, dim: int) -> ExactGrid:
    """Grids for n vectors with |coordinate| <= max_abs: every partial sum stays exact.

    Centroids are means of the data, so |c| <= max_abs as well, except right after a split
    (a factor 1 +- 1/1024); distances are then below dim * (2 max_abs)^2, with margin.
    """
    return ExactGrid(value=_grid_step(2.0 * n * max_abs),
                     dist=_grid_step(2.0 * n * dim * (2.02 * max_abs) ** 2))


def on_grid(v: np.ndarray, q: float | None) -> np.ndarray:
    v = v.astype(np.float64)
    return v if q is None else np.rint(v / q) * q  # q a power of two: / and * are exact


def make_index(dim: int, gpu: bool | None = None) -> Any:
    """A flat L2 faiss index, on all visible GPUs when faiss has GPU support and `gpu` allows."""
    import faiss

    index = faiss.IndexFlatL2(dim)
    if gpu is not False and faiss.get_num_gpus() > 0:
        index = faiss.index_cpu_to_all_gpus(index)
    elif gpu:
        log.warning("cluster: GPU asked for but this faiss has no GPU support (faiss-cpu?); "
                    "using the CPU index")
    return index


def nearest(x: np.ndarray, centroids: np.ndarray, index: Any = None) -> tuple[np.ndarray,
                                                                                np.ndarray]:
    """Nearest centroid of every row: (squared distance (n,) float32, label (n,) int64).

    Each row's result depends only on the row and the centroids (see the module docstring).
    """
    import faiss

    n, d = x.shape
    c = np.ascontiguousarray(centroids, dtype=np.float32)
    if index is None:
        index = make_index(d)
    index.reset()
    index.add(c)
    dist = np.empty(n, np.float32)
    label = np.empty(n, np.int64)
    on_gpu = not isinstance(index, faiss.IndexFlat)
    if d <= FUSED_MAX_DIM or on_gpu:
        rows, pad = SEARCH_ROWS, np.zeros((SEARCH_ROWS, d), np.float32)
    else:  # below the BLAS threshold: one pair at a time, position-free (and ~10x slower)
        rows, pad = max(1, (faiss.cvar.distance_compute_blas_threshold - 1) // d), None
    for i in range(0, n, rows):
        block = np.ascontiguousarray(x[i:i + rows], dtype=np.float32)
        m = len(block)
        if pad is not None and m < rows:
            pad[:m] = block
            pad[m:] = 0.0
            block = pad
        d2, lab = index.search(block, 1)  # (rows, 1) each
        dist[i:i + m], label[i:i + m] = d2[:m, 0], lab[:m, 0]
    return dist, label


def assign_stats(x: np.ndarray, centroids: np.ndarray, *, grid: ExactGrid | None = None,
                 index: Any = None) -> tuple[np.ndarray, np.ndarray, float]:
    """One shard's share of a Lloyd step (like faiss's `DatasetAssign.assign_to`).

    x: (n, T) float32 features; centroids: (K, T). Returns the per-cluster sums (K, T) float64,
    the counts (K,) int64 and the inertia (sum of squared distances). With `grid`, values are
    first rounded to it so that these sums, and the driver's sum of them, are exact.
    """
    k, t = len(centroids), x.shape[1]
    dist, label = nearest(x, centroids, index)
    sums = np.zeros((k, t), np.float64)
    for i in range(0, len(x), SEARCH_ROWS):
        block = np.array(x[i:i + SEARCH_ROWS].T, dtype=np.float64, order="C")  # (T, rows)
        if grid is not None:  # integer multiples of the grid: every addition below is exact
            block *= 1.0 / grid.value
            np.rint(block, out=block)
        lab = label[i:i + SEARCH_ROWS]
        for j in range(t):
            sums[:, j] += np.bincount(lab, weights=block[j], minlength=k)
    if grid is not None:
        sums *= grid.value  # a power of two: exact
    counts = np.bincount(label, minlength=k).astype(np.int64)
    inertia = float(on_grid(dist, grid and grid.dist).sum())
    return sums, counts, inertia


# ---------------------------------------------------------------------------------------------
# driver side: initialisation, update, the loop


def _faiss_clustering() -> Any:
    # faiss.contrib.clustering prints a note to stdout when scipy is missing (only its sparse
    # helpers need scipy); keep stdout clean
    with contextlib.redirect_stdout(io.StringIO()):
        from faiss.contrib import clustering
    return clustering


def smallest_by_hash(hashes: np.ndarray, ids: Sequence[str], m: int) -> np.ndarray:
    """Indices of the m rows with the smallest (hash, id), in that order.

    Taking the m smallest per shard and then again over the union gives the global m smallest,
    so the result does not depend on the sharding.
    """
    n = len(hashes)
    if m >= n:
        cand = np.arange(n)
    else:
        cut = np.partition(hashes, m - 1)[m - 1]
        cand = np.flatnonzero(hashes <= cut)  # ties at the cut stay in; the sort settles them
    order = sorted(cand.tolist(), key=lambda i: (int(hashes[i]), str(ids[i])))
    return np.asarray(order[:m], dtype=np.int64)


def kmeans_plus_plus(sample: np.ndarray, k: int, seed: int) -> np.ndarray:
    """k-means++ (D² sampling) on the sample rows (m, T) -> (k, T) float64.

    Written here rather than calling faiss's (ClusteringInitMethod_KMEANS_PLUS_PLUS via a 0-
    iteration faiss.Kmeans): that took 10.6 s for 64k x 20 -> 1000 centroids on 2 cores, this
    ~5x less. When fewer than k distinct rows exist, the rest are drawn uniformly (duplicated
    centroids; the empty clusters they make are split like any other).
    """
    s = np.ascontiguousarray(sample, dtype=np.float64)
    m = len(s)
    if m < k:
        raise ValueError(f"k-means++ needs at least k={k} sample rows, got {m}")
    rng = np.random.default_rng(seed)
    chosen = [int(rng.integers(m))]
    taken = np.zeros(m, bool)
    taken[chosen[0]] = True
    diff = s - s[chosen[0]]
    d2 = np.einsum("ij,ij->i", diff, diff)  # (m,) squared distance to the nearest chosen row
    for _ in range(1, k):
        cum = np.cumsum(d2)
        if cum[-1] > 0:
            c = int(np.searchsorted(cum, rng.random() * cum[-1], side="right"))
            if c >= m or d2[c] == 0:  # rounding at the very end of the range
                c = int(np.flatnonzero(d2)[-1])
        else:
            c = int(rng.choice(np.flatnonzero(~taken)))
        chosen.append(c)
        taken[c] = True
        diff = s - s[c]
        np.minimum(d2, np.einsum("ij,ij->i", diff, diff), out=d2)
    return s[chosen]


def init_centroids(sample: np.ndarray, k: int, seed: int,
                   method: Literal["kmeans++", "random"] = "kmeans++") -> np.ndarray:
    """Initial centroids (k, T) float64 from the canonically ordered sample (m >= k, T)."""
    if method == "kmeans++":
        return kmeans_plus_plus(sample, k, seed)
    if method == "random":
        rng = np.random.default_rng(seed)
        return np.asarray(sample, np.float64)[np.sort(rng.choice(len(sample), k, replace=False))]
    raise ParamError("init", f"unknown '{method}'", "use 'kmeans++' or 'random'")


def update_centroids(sums: np.ndarray, counts: np.ndarray, rs: np.random.RandomState,
                     previous: np.ndarray | None = None) -> tuple[np.ndarray, int]:
    """New centroids (K, T) float64 = sums / counts; then one split per empty cluster.

    The split is faiss's `reassign_centroids`: a populated cluster, drawn with probability
    proportional to (size - 1) (so mostly the largest), gives its centroid to the empty one and
    both move apart by a factor 1 +- 1/1024. With `previous` (the last update, when no
    iteration follows to use a split) empty clusters keep their previous centroid instead.
    Returns (centroids, number of splits).
    """
    centroids = sums / np.maximum(counts, 1)[:, None]
    if previous is not None:
        empty = counts == 0
        centroids[empty] = np.asarray(previous, np.float64)[empty]
        return centroids, 0
    nsplit = _faiss_clustering().reassign_centroids(counts.astype(np.int64).copy(), centroids, rs)
    return centroids, int(nsplit)


def imbalance(counts: np.ndarray) -> float:
    """Largest cluster / mean cluster size (1.0 is perfectly balanced)."""
    return float(counts.max() / max(counts.mean(), 1e-300)) if len(counts) else 0.0


@dataclass
class KMeansResult:
    """The fitted model. `centroids` are the ones the final labels are computed with."""

    centroids: np.ndarray  # (K, T) float32
    history: list[dict[str, Any]]  # one entry per Lloyd iteration
    converged: bool
    n: int
    dim: int
    grid: ExactGrid
    init_seconds: float = 0.0
    shard_sizes: list[int] = field(default_factory=list)


def lloyd(assign: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray, float]],
          centroids: np.ndarray, *, max_iter: int, tol: float, seed: int,
          on_iter: Callable[[dict[str, Any]], None] | None = None,
          ) -> tuple[np.ndarray, list[dict[str, Any]], bool]:
    """Lloyd iterations from `centroids` (K, T); `assign(c)` returns the reduced step.

    Stops after max_iter, or when the inertia is 0, or when the relative inertia improvement
    falls below tol (tol > 0) with no cluster empty and none split just before. Empty clusters
    are split after every iteration except the last (see `update_centroids`).
    """
    rs = np.random.RandomState(seed)  # consumed only by splits, as in faiss
    c = np.ascontiguousarray(centroids, dtype=np.float32)
    history: list[dict[str, Any]] = []
    prev: float | None = None
    converged, last_split = False, 0
    for it in range(1, max_iter + 1):
        t0 = time.perf_counter()
        sums, counts, inertia = assign(c)
        rel = None if prev is None else ((prev - inertia) / prev if prev > 0 else 0.0)
        empty = int((counts == 0).sum())
        # converged: no gain left (comparable only when nothing was split or is empty)
        converged = inertia == 0 or (tol > 0 and rel is not None and rel < tol and empty == 0
                                     and last_split == 0)
        final = converged or it == max_iter
        new, nsplit = update_centroids(sums, counts, rs, previous=c if final else None)
        c = new.astype(np.float32)
        rec = {"iteration": it, "inertia": inertia, "rel_improvement": rel,
               "imbalance": imbalance(counts), "empty_clusters": empty, "splits": nsplit,
               "seconds": time.perf_counter() - t0}
        history.append(rec)
        if on_iter is not None:
            on_iter(rec)
        if final:
            break
        prev, last_split = inertia, nsplit
    return c, history, converged


class Shards(Protocol):
    """The shards `fit_shards` runs on, each answering for its own rows (faiss's
    `contrib.clustering.DatasetAssign` plays this part there). Every method runs on every shard
    and returns the answers in shard order. Two backends: `LocalShards` (in-process `Shard`s)
    and `ActorShards` in s2l_ray.stages.cluster (Ray actors, each holding one `Shard`)."""

    def info(self) -> list[dict[str, Any]]:
        """Per shard: {"n": rows, "dim": T, "max_abs": largest |value|}."""
        ...

    def sample(self, seed: int, m: int) -> list[tuple[np.ndarray, list[str], np.ndarray]]:
        """Per shard: its m smallest (hash(seed, id), id) rows: (hashes, ids, rows (<=m, T))."""
        ...

    def step(self, centroids: np.ndarray, grid: ExactGrid | None
             ) -> list[tuple[np.ndarray, np.ndarray, float]]:
        """Per shard: (sums (K, T), counts (K,), inertia) of its rows under `centroids`."""
        ...


class LocalShards:
    """`Shards` held in this process (tests, `fit`, small data)."""

    def __init__(self, shards: Sequence[Shard]) -> None:
        self.shards = list(shards)

    def info(self) -> list[dict[str, Any]]:
        return [s.info() for s in self.shards]

    def sample(self, seed: int, m: int) -> list[tuple[np.ndarray, list[str], np.ndarray]]:
        return [s.sample(seed, m) for s in self.shards]

    def step(self, centroids: np.ndarray, grid: ExactGrid | None
             ) -> list[tuple[np.ndarray, np.ndarray, float]]:
        return [s.step(centroids, grid) for s in self.shards]


def fit_shards(shards: Shards, k: int, *, seed: int, max_iter: int = 20,
               tol: float = 1e-4, init: Literal["kmeans++", "random"] = "kmeans++",
               sample_per_centroid: int = 64,
               on_iter: Callable[[dict[str, Any]], None] | None = None) -> KMeansResult:
    """k-means over `shards`: only centroids go out and per-cluster sums come back."""
    t0 = time.perf_counter()
    infos = shards.info()
    n = sum(i["n"] for i in infos)
    dims = {i["dim"] for i in infos if i["n"]}
    if len(dims) > 1:
        raise ValueError(f"trajectories of different lengths across shards: {sorted(dims)}")
    if k > n:
        raise ParamError("k", f"{k} clusters for {n} examples",
                         f"use at most {n} clusters (about 100 for ~100k examples)")
    dim = dims.pop()
    m = min(n, k * sample_per_centroid)
    parts = shards.sample(seed, m)
    hashes = np.concatenate([p[0] for p in parts])
    ids = [i for p in parts for i in p[1]]
    rows = np.concatenate([p[2] for p in parts])
    sample = rows[smallest_by_hash(hashes, ids, m)]  # (m, T), ordered by hash
    start = init_centroids(sample, k, seed, init)
    grid = exact_grid(n, max(i["max_abs"] for i in infos), dim)
    init_s = time.perf_counter() - t0
    log.info("k-means: %d examples x %d, k=%d, %s init on %d sampled (%.1f s), %d shards",
             n, dim, k, init, m, init_s, len(infos))

    def assign(c: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
        got = shards.step(c, grid)
        return (sum(g[0] for g in got), sum(g[1] for g in got),  # exact: on the grid
                sum(g[2] for g in got))

    c, history, converged = lloyd(assign, start, max_iter=max_iter, tol=tol, seed=seed,
                                  on_iter=on_iter)
    return KMeansResult(c, history, converged, n, dim, grid, init_s, [i["n"] for i in infos])


class Shard:
    """One worker's rows: ids (n,) and features (n, T) float32, which never leave it."""

    def __init__(self, ids: Sequence[str], feats: np.ndarray, *, gpu: bool | None = None):
        self.ids = ids
        self.x = feats
        self.gpu = gpu
        self._index: Any = None

    def index(self) -> Any:
        if self._index is None:
            self._index = make_index(self.x.shape[1], self.gpu)
        return self._index

    def info(self) -> dict[str, Any]:
        return {"n": len(self.x), "dim": int(self.x.shape[1]),
                "max_abs": float(max(self.x.max(), -self.x.min())) if len(self.x) else 0.0}

    def sample(self, seed: int, m: int) -> tuple[np.ndarray, list[str], np.ndarray]:
        """This shard's m smallest (hash(seed, id), id): hashes, ids, rows (<= m, T)."""
        h = np.concatenate([hash_ids(self._ids(i, i + SEARCH_ROWS), seed, INIT_SALT)
                            for i in range(0, len(self.x), SEARCH_ROWS)] or
                           [np.zeros(0, np.uint64)])
        keep = smallest_by_hash(h, IdView(self.ids), m)
        return h[keep], self._ids_at(keep), self.x[keep]

    def step(self, centroids: np.ndarray, grid: ExactGrid | None
             ) -> tuple[np.ndarray, np.ndarray, float]:
        return assign_stats(self.x, centroids, grid=grid, index=self.index())

    def labels(self, centroids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(distance (n,) float32, label (n,) int64) under the final centroids."""
        return nearest(self.x, centroids, self.index())

    # ids may be a Python list or a pyarrow StringArray (actors keep Arrow: far less memory)
    def _ids(self, i: int, j: int) -> list[str]:
        part = self.ids[i:j]
        return part.to_pylist() if hasattr(part, "to_pylist") else list(part)

    def _ids_at(self, idx: np.ndarray) -> list[str]:
        if hasattr(self.ids, "take"):
            return self.ids.take(idx).to_pylist()
        return [self.ids[int(i)] for i in idx]


class IdView:
    """Single-item access to ids held as a list or a pyarrow (chunked) string array, without
    turning all of them into Python strings."""

    def __init__(self, ids: Any):
        self.ids = ids

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> str:
        v = self.ids[int(i)]
        return v.as_py() if hasattr(v, "as_py") else v


@dataclass
class KMeansFit:
    result: KMeansResult
    labels: np.ndarray  # (n,) int64, in the input row order
    distances: np.ndarray  # (n,) float32 squared L2 to the centroid


def fit(ids: Sequence[str], losses: np.ndarray, k: int, *, seed: int, max_iter: int = 20,
        tol: float = 1e-4, init: Literal["kmeans++", "random"] = "kmeans++",
        sample_per_centroid: int = 64, normalize: Literal["none", "standardize"] = "none",
        n_shards: int = 1) -> KMeansFit:
    """In-process k-means with the distributed engine's exact semantics (n_shards splits)."""
    x = features(losses, normalize, ids)
    if len(ids) != len(x):
        raise ValueError(f"{len(ids)} ids for {len(x)} trajectories")
    bounds = np.linspace(0, len(x), n_shards + 1).astype(int)
    shards = LocalShards([Shard(list(ids[a:b]), x[a:b]) for a, b in itertools.pairwise(bounds)])
    res = fit_shards(shards, k, seed=seed, max_iter=max_iter, tol=tol, init=init,
                     sample_per_centroid=sample_per_centroid)
    dist, label = nearest(x, res.centroids)
    return KMeansFit(res, label, dist)


def objective(x: np.ndarray, centroids: np.ndarray) -> float:
    """Sum of squared distances of the rows (n, T) to their nearest centroid (K, T)."""
    dist, _ = nearest(np.ascontiguousarray(x, dtype=np.float32), centroids)
    return float(dist.astype(np.float64).sum())
