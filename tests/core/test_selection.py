"""s2l_ray.core.selection: S2L's Algorithm 1 and the baselines, pure, in memory (ms)."""

from __future__ import annotations

import numpy as np
import pytest

from s2l_ray.config import ConfigError
from s2l_ray.core import selection as sel
from s2l_ray.core.methods import SELECTION_METHODS
from s2l_ray.errors import ParamError, config_keys

N = 240


@pytest.fixture(scope="module")
def data() -> dict:
    rng = np.random.default_rng(0)
    sizes = [1, 2, 3, 5, 9, 20, 40, 160]  # skewed clusters, several below their share
    labels = np.repeat(np.arange(len(sizes)), sizes)
    rng.shuffle(labels)
    losses = np.sort(rng.uniform(0.2, 4.0, (N, 8)), axis=1)[:, ::-1].copy()  # decreasing
    return {"ids": [f"id{i:04d}" for i in range(N)], "labels": labels,
            "sources": [None if i % 7 == 0 else f"src{i % 3}" for i in range(N)],
            "losses": losses}


def run(method: str, d: dict, budget: int | float, seed: int = 0, order=None) -> list[str]:
    o = np.arange(N) if order is None else order
    return sel.select(method, [d["ids"][i] for i in o], budget, seed,
                      labels=d["labels"][o], sources=[d["sources"][i] for i in o],
                      losses=d["losses"][o])


@pytest.mark.parametrize(("budget", "n", "want"), [
    (0.1, 100, 10), (0.15, 10, 2), (0.35, 10, 4), (0.001, 10, 1), (1.0, 7, 7), (7, 7, 7),
    (1, 3, 1), (np.int64(5), 9, 5)])
def test_budget_resolves(budget, n: int, want: int) -> None:
    assert sel.resolve_budget(budget, n) == want


@pytest.mark.parametrize("budget", [0.0, 1.5, -0.2, float("nan"), 0, -3, True])
def test_bad_budget_names_the_key_and_fix(budget) -> None:
    with pytest.raises(ParamError, match=r"^budget: .*Fix"):  # Ray-free: names the argument
        sel.resolve_budget(budget, 100)
    with pytest.raises(ConfigError, match=r"'select\.budget'.*Fix"), config_keys("select"):
        sel.resolve_budget(budget, 100)  # the stage adapter names the key


def test_budget_over_n_is_an_error_naming_the_fix() -> None:
    with pytest.raises(ConfigError, match=r"'select\.budget'.*more than the 7.*at most 7"), \
            config_keys("select"):
        sel.resolve_budget(8, 7)
    with pytest.raises(ConfigError, match=r"'sweep\.budgets'.*no examples"), \
            config_keys("sweep", {"budget": "sweep.budgets"}):
        sel.select("random", [], 1, 0)


def test_s2l_quotas_follow_algorithm_1() -> None:
    assert sel.s2l_quotas([1, 2, 100], 30).tolist() == [1, 2, 27]  # small clusters whole
    assert sel.s2l_quotas([3, 50, 50, 7], 60).tolist() == [3, 25, 25, 7]
    assert sel.s2l_quotas([5] * 10, 3).tolist() == [0] * 7 + [1] * 3  # B < K: the last get one
    assert sel.s2l_quotas([4, 0, 6], 10).tolist() == [4, 0, 6]  # B = N, an empty cluster
    assert sel.s2l_quotas([10, 10, 10], 10).tolist() == [3, 3, 4]  # remainder to the last


def test_s2l_quotas_properties_on_random_cases() -> None:
    rng = np.random.default_rng(1)
    for _ in range(300):
        sizes = rng.integers(0, 60, rng.integers(1, 30))
        if sizes.sum() == 0:
            continue
        b = int(rng.integers(1, sizes.sum() + 1))
        q = sel.s2l_quotas(sizes, b)
        assert q.sum() == b and (q >= 0).all() and (q <= sizes).all()
        partial = q < sizes  # clusters sampled, not taken whole
        if partial.any():  # water-filling: an even share (+-1), no whole cluster above it
            assert q[partial].max() - q[partial].min() <= 1
            assert q[~partial].max(initial=0) <= q[partial].max()


def test_stratified_quotas_are_proportional() -> None:
    assert sel.stratified_quotas([10, 30, 60], 7).tolist() == [1, 2, 4]
    assert sel.stratified_quotas([50, 50], 100).tolist() == [50, 50]
    q = sel.stratified_quotas([3, 1000, 7], 1)
    assert q.sum() == 1 and q[1] == 1


@pytest.mark.parametrize("method", SELECTION_METHODS)
@pytest.mark.parametrize("budget", [1, 5, 17, 0.5, N])
def test_every_method_returns_exactly_b_distinct_valid_ids(data, method: str, budget) -> None:
    got = run(method, data, budget)
    b = sel.resolve_budget(budget, N)
    assert len(got) == b and len(set(got)) == b and set(got) <= set(data["ids"])


@pytest.mark.parametrize("method", SELECTION_METHODS)
def test_selection_is_seeded_and_independent_of_row_order(data, method: str) -> None:
    a = run(method, data, 30, seed=3)
    for order in (np.random.default_rng(2).permutation(N), np.arange(N)[::-1]):
        assert run(method, data, 30, seed=3, order=order) == a


@pytest.mark.parametrize("method", ["s2l", "random", "stratified"])
def test_the_seed_changes_random_choices(data, method: str) -> None:
    assert set(run(method, data, 30, seed=1)) != set(run(method, data, 30, seed=2))


def test_s2l_takes_small_clusters_whole_and_spreads_the_rest(data) -> None:
    got = set(run("s2l", data, 40))
    lab = dict(zip(data["ids"], data["labels"]))
    per = np.bincount([lab[i] for i in got], minlength=8)
    sizes = np.bincount(data["labels"])
    assert per.tolist() == sel.s2l_quotas(sizes, 40).tolist()
    assert (per[:4] == sizes[:4]).all()  # 1 + 2 + 3 + 5 taken whole
    assert per[4:].min() >= 7  # the rest share 29 evenly


def test_loss_baselines_rank_by_their_score(data) -> None:
    ids, x = np.array(data["ids"]), data["losses"]
    final = x[:, -1]
    assert set(run("least_confidence", data, 10)) == set(ids[np.argsort(-final)[:10]])
    assert set(run("high_learnability", data, 10)) == set(ids[np.argsort(-(x[:, 0] - final))[:10]])
    e = sel.early_checkpoints(8, 0.2)
    assert e == 2
    assert set(run("el2n", data, 10)) == set(ids[np.argsort(-x[:, :e].mean(1))[:10]])
    mid = set(run("middle_perplexity", data, 10))
    assert mid == set(ids[np.argsort(np.abs(final - np.median(final)))[:10]])


def test_ties_fall_back_to_the_seeded_hash(data) -> None:
    flat = {**data, "losses": np.ones((N, 8))}
    assert run("least_confidence", flat, 25, seed=4) == run("random", flat, 25, seed=4)
    assert run("el2n", flat, 25, seed=4) != run("el2n", flat, 25, seed=5)


def test_stratified_keeps_source_proportions(data) -> None:
    src = dict(zip(data["ids"], data["sources"]))
    got = run("stratified", data, 60)
    names, groups = sel.source_groups(data["sources"])
    want = sel.stratified_quotas(np.bincount(groups), 60)
    have = [sum(src[i] == name for i in got) for name in names]
    assert have == want.tolist() and names[0] is None


def test_nan_scores_rank_last() -> None:
    losses = np.array([[1.0, np.nan], [1.0, 0.5], [1.0, 0.9]])
    assert sel.select("least_confidence", ["a", "b", "c"], 2, 0, losses=losses) == ["c", "b"]


def test_hash_collisions_are_settled_by_id() -> None:
    idx = sel.top_per_group(np.zeros(4, int), None, np.array([5, 5, 5, 1], np.uint64),
                            ["d", "b", "c", "a"], np.array([3]))
    assert idx.tolist() == [3, 1, 2]


def test_missing_inputs_and_duplicates_are_errors(data) -> None:
    with pytest.raises(ValueError, match="needs labels"):
        sel.select("s2l", data["ids"], 3, 0)
    with pytest.raises(ValueError, match="distinct"):
        sel.select("random", ["a", "a"], 1, 0)
    with pytest.raises(ParamError, match=r"^method: unknown 'facility_location'"):
        sel.select("facility_location", data["ids"], 3, 0)
