"""Spending the budget: S2L (the paper's Algorithm 1) and the baselines, as pure functions.

Every method is one operation: each example gets a group, a score and a tie-break hash of
(seed, id); the first q_g examples of each group g, ordered by (score descending, hash, id), are
selected, where the quotas q_g add up to the budget B.

    s2l                groups = clusters, quotas from Algorithm 1 (`s2l_plan`), no score: the
                       hash order makes the pick uniformly random within each cluster. Options:
                       per-source allocation (clusters fitted within each source; the budget
                       split over sources smallest first, then over that source's clusters),
                       tiny clusters held back into a pool, and the noise cap (`noisy_clusters`)
    random             one group, quota B, no score: a uniformly random B-subset
    stratified         groups = sources, quotas proportional to the source sizes
    source_balanced    groups = sources, quotas by Algorithm 1 over the sources (the budget split
                       evenly, smallest first, a small source taken whole): S2L's per-source
                       split with no trajectories, the control that says what clusters add
    least_confidence   one group, score = final loss (highest first)
    middle_perplexity  one group, score = -|final loss - median final loss|
    high_learnability  one group, score = first loss - final loss (largest drop first)
    el2n               one group, score = mean loss over the first checkpoints (EL2N-style)

An example's rank depends only on its own values and the hash of its id, never on the row
order. Taking the top q_g per group of any part of the data, and again over the union of the
parts, gives the global top q_g: the select stage does this over files with Ray tasks, so the
selection is identical whatever the files, blocks or workers. A NaN score ranks last.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from s2l_ray.core.hashing import hash_ids
from s2l_ray.core.methods import LOSS_METHODS, SELECTION_METHODS, budget_problem
from s2l_ray.errors import ParamError

SELECT_SALT = "select"


def resolve_budget(budget: int | float, n: int) -> int:
    """A count (int) or a fraction (float in (0, 1]) of n -> the number of examples B.

    Fractions round half up (0.15 x 10 -> 2), and at least 1; B > n is an error (ParamError
    on `budget`).
    """
    if isinstance(budget, np.integer):
        budget = int(budget)
    elif isinstance(budget, np.floating):
        budget = float(budget)
    bad = budget_problem(budget)
    if bad:
        raise ParamError("budget", *bad)
    if n < 1:
        raise ParamError("budget", "there are no examples to select from",
                         "check the reports of the upstream stages")
    b = max(1, math.floor(round(budget * n, 6) + 0.5)) if isinstance(budget, float) else budget
    if b > n:
        raise ParamError("budget", f"budget {b} is more than the {n} examples available",
                         f"use a count of at most {n}, or a fraction such as 0.1")
    return int(b)


def id_hashes(ids: Sequence[str], seed: int) -> np.ndarray:
    """The selection's tie-break / random order: 64-bit hash of (seed, id), (n,) uint64."""
    return hash_ids(ids, seed, SELECT_SALT)


def s2l_quotas(sizes: Sequence[int] | np.ndarray, budget: int) -> np.ndarray:
    """Examples to take from each cluster, Algorithm 1 of the S2L paper: (K,) int64, sum = B.

    Clusters are visited from the smallest (ties: lower cluster index first); the k-th takes
    min(size, R) with R = (B - |S|) / (K - k + 1) rounded down. Small clusters are taken whole
    and their unused share flows to the larger ones; the rounding remainders flow on too, so
    the last (largest) clusters get them and the total is exactly B (each step leaves at most
    what the remaining, larger clusters can hold).
    """
    s = np.asarray(sizes, dtype=np.int64)
    if budget > int(s.sum()):
        raise ParamError("budget", f"budget {budget} is more than the {int(s.sum())} examples "
                         "available", "use a smaller budget")
    quotas = _even_split(s, int(budget))
    if int(quotas.sum()) != budget:  # pragma: no cover - impossible, see the docstring
        raise RuntimeError(f"s2l_quotas left {budget - int(quotas.sum())} of the budget "
                           "unassigned")
    return quotas


def _even_split(sizes: np.ndarray, budget: int) -> np.ndarray:
    """Algorithm 1's loop: smallest first, each takes min(size, left // groups left).

    Spends min(budget, sum(sizes)); sizes (K,) int64 >= 0, the order is stable (ties: lower
    index first), as the official code's `n // (len - i)` loop over sizes sorted ascending.
    """
    if (sizes < 0).any():
        raise ValueError("cluster sizes must be >= 0")
    if budget < 0:
        raise ValueError(f"budget must be >= 0, got {budget}")
    quotas = np.zeros(len(sizes), np.int64)
    left = int(budget)
    for pos, c in enumerate(np.argsort(sizes, kind="stable")):
        take = min(int(sizes[c]), left // (len(sizes) - pos))
        quotas[c] = take
        left -= take
    return quotas


def s2l_plan(sizes: Sequence[int] | np.ndarray, budget: int, *,
             cell_source: Sequence[int] | np.ndarray | None = None, tiny: int = 0,
             caps: Sequence[int] | np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """S2L's allocation with the official code's options: (group of each cell (K,), quotas (G,)).

    sizes: (K,) rows per cell. A cell is a cluster, or with per-source allocation a
    (cluster, source) pair; `cell_source` (K,) gives each cell's source index (None: one source,
    the paper's global Algorithm 1). Steps:
      1. per source (smallest first, ties: lower index): share = budget left // sources left; a
         source no larger than its share is taken whole and the rest passes on (Algorithm 1 over
         the sources, as `schedules/s2l.py` does);
      2. inside a source, its share is spread by Algorithm 1 over its cells larger than `tiny`;
         cells of <= `tiny` rows (the official code: 2) are held back in one pool per source,
         which gets only what the other cells could not take (drawn uniformly over its rows);
      3. `caps` (K,) bounds what a cell may get (the noise cap): a capped cell counts as
         min(size, cap) rows in steps 1-2, so its unused share flows on like a small cluster's.
         Only if the capped cells leave the budget unspent (most of the data capped) is the
         rest spread over what they hold beyond their caps (Algorithm 1 again).
    Cell k's rows belong to group k, except held-back cells: their rows belong to the pool of
    their source, group K + source. quotas (K + S,) sum to exactly `budget`.
    Raises ValueError for a budget above sum(sizes), negative sizes or mismatched lengths.
    """
    s = np.asarray(sizes, dtype=np.int64)
    k = len(s)
    if s.ndim != 1:
        raise ValueError(f"sizes must be 1-D, got shape {s.shape}")
    if (s < 0).any():
        raise ValueError("cluster sizes must be >= 0")
    b = int(budget)
    if b < 0 or b > int(s.sum()):
        raise ValueError(f"budget {b} is outside [0, {int(s.sum())}] (the rows available)")
    if tiny < 0:
        raise ValueError(f"tiny must be >= 0, got {tiny}")
    src = np.zeros(k, np.int64) if cell_source is None else np.asarray(cell_source, np.int64)
    if src.shape != (k,) or (k and src.min() < 0):
        raise ValueError(f"cell_source must be {k} source indices >= 0")
    n_src = int(src.max()) + 1 if k else 1
    cap = s.copy()
    if caps is not None:
        c = np.asarray(caps, dtype=np.int64)
        if c.shape != (k,) or (c < 0).any():
            raise ValueError(f"caps must be {k} counts >= 0")
        cap = np.minimum(s, c)
    held = (s <= tiny) if tiny > 0 else np.zeros(k, bool)
    eff = np.where(held, s, cap)  # what each cell may give in steps 1-2
    quotas = np.zeros(k + n_src, np.int64)
    share = _even_split(np.bincount(src, weights=eff, minlength=n_src).astype(np.int64), b)
    for j in range(n_src):
        mine = np.flatnonzero((src == j) & ~held)
        q = _even_split(eff[mine], int(share[j]))
        quotas[mine] = q
        quotas[k + j] = int(share[j]) - int(q.sum())  # <= the pool: share <= eff of source j
    rest = b - int(quotas.sum())
    if rest:  # capped cells could not spend it all: spread over what lies beyond the caps
        spare = np.where(held, 0, s - quotas[:k])
        quotas[:k] += _even_split(spare, rest)
    if int(quotas.sum()) != b:  # pragma: no cover - impossible: budget <= sum(sizes)
        raise RuntimeError(f"s2l_plan assigned {int(quotas.sum())} of {b}")
    group = np.where(held, k + src, np.arange(k))
    return group, quotas


def noisy_clusters(first: Sequence[float] | np.ndarray, last: Sequence[float] | np.ndarray,
                   sizes: Sequence[int] | np.ndarray, drop_ratio: float) -> np.ndarray:
    """Clusters whose loss does not fall, relative to the data: (K,) bool.

    first, last: (K,) each cluster's mean loss at the first and at the last reference
    checkpoint; sizes (K,). The data's relative drop is D = 1 - L/F (F, L: the size-weighted
    means over all rows); cluster c is noise when it ends harder than the data (last_c > L) and
    its own relative drop 1 - last_c / first_c is below drop_ratio x D. Rows the reference
    cannot learn (a wrong answer is unpredictable) keep a high loss; rare but learnable kinds
    start high and fall, and already-easy rows end below L, so neither is flagged. When the data
    does not learn at all (D <= 0) nothing is flagged: there is no yardstick.
    """
    f = np.asarray(first, dtype=np.float64)
    la = np.asarray(last, dtype=np.float64)
    n = np.asarray(sizes, dtype=np.float64)
    if not f.shape == la.shape == n.shape or f.ndim != 1:
        raise ValueError(f"first, last and sizes must be (K,) alike, got {f.shape}, "
                         f"{la.shape}, {n.shape}")
    if not 0 <= drop_ratio <= 1:
        raise ValueError(f"drop_ratio must lie in [0, 1], got {drop_ratio}")
    ok = (n > 0) & np.isfinite(f) & np.isfinite(la)
    if not ok.any():
        return np.zeros(len(f), bool)
    w = n[ok] / n[ok].sum()
    big_f, big_l = float(w @ f[ok]), float(w @ la[ok])
    data_drop = 1.0 - big_l / big_f if big_f > 0 else 0.0
    if not data_drop > 0:
        return np.zeros(len(f), bool)
    with np.errstate(divide="ignore", invalid="ignore"):
        drop = np.where(f > 0, 1.0 - la / np.where(f > 0, f, 1.0), 0.0)
    return ok & (la > big_l) & (drop < drop_ratio * data_drop)


def base_rate_caps(sizes: Sequence[int] | np.ndarray, flagged: np.ndarray, budget: int,
                   total: int) -> np.ndarray:
    """Caps (K,) for `s2l_plan`: floor(B x size / N) for flagged cells (their share under
    uniform sampling, the data's base rate), the cell's size otherwise (no cap)."""
    s = np.asarray(sizes, dtype=np.int64)
    if total < 1:
        raise ValueError("total must be >= 1")
    return np.where(np.asarray(flagged, bool), s * int(budget) // int(total), s)


def stratified_quotas(sizes: Sequence[int] | np.ndarray, budget: int) -> np.ndarray:
    """Proportional allocation (K,) int64, sum = B: floor(B n_g / N), then one more for the
    groups with the largest remainders (ties: lower group index first)."""
    s = np.asarray(sizes, dtype=np.int64)
    total = int(s.sum())
    if budget > total:
        raise ParamError("budget", f"budget {budget} is more than the {total} examples "
                         "available", "use a smaller budget")
    base, rem = np.divmod(s * int(budget), max(total, 1))
    extra = int(budget) - int(base.sum())
    order = np.lexsort((np.arange(len(s)), -rem))
    base[order[:extra]] += 1  # rem > 0 there, so base + 1 <= n_g
    return base


def source_groups(sources: Sequence[str | None]) -> tuple[list[str | None], np.ndarray]:
    """Sorted distinct sources (None first) and each row's index into them."""
    names = sorted(set(sources), key=lambda v: (v is not None, v or ""))
    where = {v: i for i, v in enumerate(names)}
    return names, np.fromiter((where[v] for v in sources), np.int64, count=len(sources))


def early_checkpoints(t: int, early_fraction: float) -> int:
    """How many leading checkpoints el2n averages: ceil(early_fraction x T), at least 1."""
    return max(1, min(t, math.ceil(round(early_fraction * t, 6))))


def loss_scores(losses: np.ndarray, method: str, *, median: float | None = None,
                early_fraction: float = 0.2) -> np.ndarray:
    """Per-example score (n,) float64 of a loss baseline; higher is selected first.

    losses: (n, T), the loss at each reference checkpoint in order. `median` is the median
    final loss over ALL examples (computed here when the losses are all of them).
    """
    x = np.asarray(losses, dtype=np.float64)
    if x.ndim != 2 or x.shape[1] < 1:
        raise ValueError(f"losses must be (n, T), got shape {x.shape}")
    final = x[:, -1]
    if method == "least_confidence":
        return final.copy()
    if method == "middle_perplexity":  # in loss space: perplexity is exp(loss), same median
        med = float(np.nanmedian(final)) if median is None else median
        return -np.abs(final - med)
    if method == "high_learnability":
        return x[:, 0] - final
    if method == "el2n":
        e = early_checkpoints(x.shape[1], early_fraction)
        return sum(x[:, j] for j in range(e)) / e  # column by column: same bits for any n
    raise ParamError("method", f"'{method}' has no loss score",
                     f"use one of {', '.join(LOSS_METHODS)}")


def top_per_group(groups: np.ndarray, scores: np.ndarray | None, hashes: np.ndarray,
                  ids: Sequence[str], quotas: np.ndarray) -> np.ndarray:
    """Indices of the first quotas[g] rows of every group g by (score desc, hash, id).

    Returned in (group, rank) order. groups: (n,) ints in [0, len(quotas)); scores: (n,) or
    None (all equal); hashes: (n,) uint64.
    """
    g = np.asarray(groups, dtype=np.int64)
    n = len(g)
    q = np.asarray(quotas, dtype=np.int64)
    if n and (g.min() < 0 or g.max() >= len(q)):
        raise ValueError(f"group ids must lie in [0, {len(q)})")
    key = np.zeros(n) if scores is None else -np.asarray(scores, dtype=np.float64)
    key = np.where(np.isnan(key), np.inf, key)  # NaN scores last
    h = np.asarray(hashes, dtype=np.uint64)
    order = np.lexsort((h, key, g))  # last key is primary: group, then -score, then hash
    gs, ks, hs = g[order], key[order], h[order]
    tie = np.flatnonzero((gs[1:] == gs[:-1]) & (ks[1:] == ks[:-1]) & (hs[1:] == hs[:-1]))
    for i in tie:  # a 64-bit hash collision (about never): settle by id
        j = i + 2
        while j < n and j - 1 in tie:
            j += 1
        order[i:j] = sorted(order[i:j].tolist(), key=lambda r: str(ids[r]))
    starts = np.flatnonzero(np.r_[True, gs[1:] != gs[:-1]]) if n else np.zeros(0, np.int64)
    pos = np.arange(n) - np.repeat(starts, np.diff(np.r_[starts, n]))  # rank within group
    return order[pos < q[gs]]


def s2l_groups(labels: np.ndarray, budget: int, *, sources: Sequence[str | None] | None = None,
               per_source: bool = False, tiny: int = 0, losses: np.ndarray | None = None,
               noise_drop_ratio: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """S2L's groups and quotas for rows in memory: (group of each row (n,), quotas (G,)).

    labels (n,) cluster ids >= 0. per_source: cells are (cluster, source) pairs and the budget is
    split over the sources first (`s2l_plan`; rows without a source form their own source).
    tiny: cells of <= tiny rows are pooled per source. noise_drop_ratio (needs `losses` (n, T)):
    clusters `noisy_clusters` flags are capped at their base-rate share (`base_rate_caps`).
    """
    lab = np.asarray(labels, dtype=np.int64)
    n = len(lab)
    if n and lab.min() < 0:
        raise ValueError("cluster labels must be >= 0")
    k = int(lab.max()) + 1 if n else 0
    if per_source:
        names, sidx = source_groups(_need(sources, "sources", "s2l per_source", n))
        cells, row_cell = np.unique(lab * len(names) + sidx, return_inverse=True)
        cell_cluster, cell_source = cells // len(names), cells % len(names)
    else:
        row_cell, cell_cluster, cell_source = lab, np.arange(k), None
    sizes = np.bincount(row_cell, minlength=len(cell_cluster))
    caps = None
    if noise_drop_ratio is not None:
        first, last = cluster_loss_means(lab, _need(losses, "losses", "s2l noise cap", n), k)
        flagged = noisy_clusters(first, last, np.bincount(lab, minlength=k), noise_drop_ratio)
        caps = base_rate_caps(sizes, flagged[cell_cluster], budget, n)
    group_of_cell, quotas = s2l_plan(sizes, budget, cell_source=cell_source, tiny=tiny,
                                     caps=caps)
    return group_of_cell[row_cell], quotas


def cluster_loss_means(labels: np.ndarray, losses: np.ndarray, k: int
                       ) -> tuple[np.ndarray, np.ndarray]:
    """Each cluster's mean loss at the first and the last checkpoint: two (k,) float64 (NaN
    for an empty cluster). NaN losses count as 0, as the trajectories are clustered."""
    x = np.nan_to_num(np.asarray(losses, dtype=np.float64), nan=0.0)
    if x.ndim != 2 or len(x) != len(labels):
        raise ValueError(f"losses must be (n, T) for n={len(labels)} labels, got {x.shape}")
    counts = np.bincount(labels, minlength=k).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (np.bincount(labels, weights=x[:, 0], minlength=k) / counts,
                np.bincount(labels, weights=x[:, -1], minlength=k) / counts)


def select(method: str, ids: Sequence[str], budget: int | float, seed: int, *,
           labels: Sequence[int] | np.ndarray | None = None,
           sources: Sequence[str | None] | None = None,
           losses: np.ndarray | None = None, early_fraction: float = 0.2,
           per_source: bool = False, tiny: int = 0,
           noise_drop_ratio: float | None = None) -> list[str]:
    """Exactly B distinct ids chosen by `method`, in (group, rank) order.

    s2l needs `labels` (cluster of each example) and, with its options (see `s2l_groups`),
    `sources` / `losses`; stratified and source_balanced need `sources`, the loss baselines
    `losses` (n, T). Everything is in memory; the select stage runs the same steps per file.
    """
    n = len(ids)
    b = resolve_budget(budget, n)
    if len(set(ids)) != n:
        raise ValueError("ids must be distinct")
    hashes = id_hashes(ids, seed)
    groups = np.zeros(n, np.int64)
    scores: np.ndarray | None = None
    quotas = np.array([b])
    if method == "s2l":
        groups, quotas = s2l_groups(np.asarray(_need(labels, "labels", method, n)), b,
                                    sources=sources, per_source=per_source, tiny=tiny,
                                    losses=losses, noise_drop_ratio=noise_drop_ratio)
    elif method in ("stratified", "source_balanced"):
        _, groups = source_groups(_need(sources, "sources", method, n))
        quotas = source_quotas(method, np.bincount(groups), b)
    elif method in LOSS_METHODS:
        scores = loss_scores(_need(losses, "losses", method, n), method,
                             early_fraction=early_fraction)
    elif method != "random":
        raise ParamError("method", f"unknown '{method}'",
                         f"use one of {', '.join(SELECTION_METHODS)}")
    return [ids[i] for i in top_per_group(groups, scores, hashes, ids, quotas)]


def source_quotas(method: str, sizes: Sequence[int] | np.ndarray, budget: int) -> np.ndarray:
    """Per-source quotas: proportional (stratified) or Algorithm 1 over the sources, smallest
    first (source_balanced, the official code's source split with no trajectories)."""
    if method == "stratified":
        return stratified_quotas(sizes, budget)
    if method == "source_balanced":
        return s2l_quotas(sizes, budget)
    raise ValueError(f"'{method}' has no per-source quotas")


def _need(value: Any, name: str, method: str, n: int) -> Any:
    if value is None:
        raise ValueError(f"method '{method}' needs {name}")
    if len(value) != n:
        raise ValueError(f"{name} has {len(value)} rows for {n} ids")
    return value
