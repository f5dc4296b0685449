"""Spending the budget: S2L (the paper's Algorithm 1) and the baselines, as pure functions.

Every method is one operation: each example gets a group, a score and a tie-break hash of
(seed, id); the first q_g examples of each group g, ordered by (score descending, hash, id), are
selected, where the quotas q_g add up to the budget B.

    s2l                groups = clusters, quotas from Algorithm 1 (`s2l_quotas`), no score: the
                       hash order makes the pick uniformly random within each cluster
    random             one group, quota B, no score: a uniformly random B-subset
    stratified         groups = sources, quotas proportional to the source sizes
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
    if (s < 0).any():
        raise ValueError("cluster sizes must be >= 0")
    if budget > int(s.sum()):
        raise ParamError("budget", f"budget {budget} is more than the {int(s.sum())} examples "
                         "available", "use a smaller budget")
    quotas = np.zeros(len(s), np.int64)
    left = int(budget)
    for pos, c in enumerate(np.argsort(s, kind="stable")):
        take = min(int(s[c]), left // (len(s) - pos))
        quotas[c] = take
        left -= take
    if left:  # pragma: no cover - impossible when budget <= sum(sizes), see the docstring
        raise RuntimeError(f"s2l_quotas left {left} of the budget unassigned")
    return quotas


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


def select(method: str, ids: Sequence[str], budget: int | float, seed: int, *,
           labels: Sequence[int] | np.ndarray | None = None,
           sources: Sequence[str | None] | None = None,
           losses: np.ndarray | None = None, early_fraction: float = 0.2) -> list[str]:
    """Exactly B distinct ids chosen by `method`, in (group, rank) order.

    s2l needs `labels` (cluster of each example), stratified `sources`, the loss baselines
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
        lab = _need(labels, "labels", method, n)
        groups = np.asarray(lab, dtype=np.int64)
        quotas = s2l_quotas(np.bincount(groups, minlength=int(groups.max()) + 1), b)
    elif method == "stratified":
        _, groups = source_groups(_need(sources, "sources", method, n))
        quotas = stratified_quotas(np.bincount(groups), b)
    elif method in LOSS_METHODS:
        scores = loss_scores(_need(losses, "losses", method, n), method,
                             early_fraction=early_fraction)
    elif method != "random":
        raise ParamError("method", f"unknown '{method}'",
                         f"use one of {', '.join(SELECTION_METHODS)}")
    return [ids[i] for i in top_per_group(groups, scores, hashes, ids, quotas)]


def _need(value: Any, name: str, method: str, n: int) -> Any:
    if value is None:
        raise ValueError(f"method '{method}' needs {name}")
    if len(value) != n:
        raise ValueError(f"{name} has {len(value)} rows for {n} ids")
    return value
