"""The official S2L rules (per-source split, tiny clusters held back), source_balanced and the
noise cap: exact counts on hand-built clusters. Pure numpy, no Ray."""

from __future__ import annotations

import numpy as np
import pytest

from s2l_ray.core.selection import (
    base_rate_caps,
    cluster_loss_means,
    noisy_clusters,
    s2l_groups,
    s2l_plan,
    s2l_quotas,
    select,
    source_quotas,
)


def test_plan_without_options_is_algorithm_1():
    sizes = [7, 1, 30, 4, 12]
    group, q = s2l_plan(sizes, 20)
    assert group.tolist() == [0, 1, 2, 3, 4]
    assert q[:5].tolist() == s2l_quotas(sizes, 20).tolist() and q[5] == 0


def test_per_source_split_exact_counts():
    # source 0: one cell of 3 rows; source 1: cells 10, 1, 2, 20 (1 and 2 held back);
    # source 2: cells 50, 40
    sizes = [3, 10, 1, 2, 20, 50, 40]
    src = [0, 1, 1, 1, 1, 2, 2]
    group, q = s2l_plan(sizes, 30, cell_source=src, tiny=2)
    # sources by size 3, 33, 90: 30//3=10 > 3 -> all 3; 27//2=13 -> 13; the last 14
    # source 1: cells 10, 20 (smallest first): 13//2=6, then 7; its pool gets nothing
    # source 2: cells 40, 50: 14//2=7, then 7
    assert q[:7].tolist() == [3, 6, 0, 0, 7, 7, 7]
    assert q[7:].tolist() == [0, 0, 0]  # pools of sources 0, 1, 2
    assert group.tolist() == [0, 1, 7 + 1, 7 + 1, 4, 5, 6]  # tiny cells -> their source's pool
    assert int(q.sum()) == 30


def test_leftover_passes_on_and_tiny_pool_gets_the_rest():
    # source 0: 2 rows (smaller than its share); source 1: cells 3, 4 + tiny 2, 1; source 2: 40
    sizes = [2, 3, 4, 2, 1, 40]
    src = [0, 1, 1, 1, 1, 2]
    group, q = s2l_plan(sizes, 30, cell_source=src, tiny=2)
    # sources 2, 10, 40: 30//3=10 -> 2 (whole, 8 pass on); 28//2=14 > 10 -> 10 (whole); 18
    # source 1 inside: cells 3, 4 take 3 and 4, the pool (2 + 1 rows) gets the other 3
    assert q[:6].tolist() == [0, 3, 4, 0, 0, 18]
    assert group.tolist() == [6, 1, 2, 7, 7, 5]  # source 0's only cell is tiny too: pooled
    assert q[6:].tolist() == [2, 3, 0]


def test_pool_drawn_only_for_what_others_cannot_take():
    sizes = [1, 2, 50, 60]
    _, q = s2l_plan(sizes, 40, tiny=2)
    assert q.tolist() == [0, 0, 20, 20, 0]  # the tiny clusters' rows get nothing
    _, q = s2l_plan(sizes, 111, tiny=2)  # 1 left after the others are taken whole
    assert q.tolist() == [0, 0, 50, 60, 1]
    _, q = s2l_plan(sizes, 113, tiny=2)  # all the data
    assert q.tolist() == [0, 0, 50, 60, 3]


@pytest.mark.parametrize("budget", [-1, 101])
def test_budget_outside_the_data_is_an_error(budget):
    with pytest.raises(ValueError, match="budget"):
        s2l_plan([50, 50], budget, cell_source=[0, 1], tiny=2)
    ids = [f"r{i}" for i in range(100)]
    with pytest.raises(ValueError):
        select("s2l", ids, budget if budget > 0 else 0, 0, labels=[i % 3 for i in range(100)],
               sources=["a"] * 100, per_source=True)


def _rows(seed: int = 0):
    rng = np.random.default_rng(seed)
    n = 400
    ids = [f"x{i:04d}" for i in range(n)]
    sources = rng.choice(["alg", "geo", None, "num"], n, p=[0.6, 0.25, 0.05, 0.1]).tolist()
    labels = rng.integers(0, 12, n)
    labels[:3] = 11  # a cluster of 3 (with the rest of label 11)
    return ids, labels, sources


def test_per_source_select_exact_counts_and_input_order():
    ids, labels, sources = _rows()
    got = select("s2l", ids, 80, 7, labels=labels, sources=sources, per_source=True, tiny=2)
    assert len(got) == 80 == len(set(got))
    # the per-source counts are those of the budget split over the sources' sizes
    pos = {i: k for k, i in enumerate(ids)}
    names = sorted({s for s in sources if s is not None})
    sizes = [sum(s is None for s in sources)] + [sources.count(x) for x in names]
    expect = s2l_quotas(sizes, 80).tolist()
    chosen = [sources[pos[i]] for i in got]
    assert [sum(c is None for c in chosen)] + [chosen.count(x) for x in names] == expect
    assert sum(c is None for c in chosen) > 0  # rows without a source: their own group
    perm = np.random.default_rng(1).permutation(len(ids))
    again = select("s2l", [ids[i] for i in perm], 80, 7, labels=labels[perm],
                   sources=[sources[i] for i in perm], per_source=True, tiny=2)
    assert again == got


def test_rows_without_source_form_their_own_group():
    ids = [f"r{i}" for i in range(30)]
    sources = [None] * 10 + ["a"] * 20
    labels = np.zeros(30, int)  # one cluster, split by source into two cells
    g, q = s2l_groups(labels, 10, sources=sources, per_source=True)
    # sources (none)=10 rows, a=20 rows: 10//2=5 each
    assert q.tolist() == [5, 5, 0, 0]
    assert set(g[:10].tolist()) == {0} and set(g[10:].tolist()) == {1}
    got = select("s2l", ids, 10, 0, labels=labels, sources=sources, per_source=True)
    assert sum(int(i[1:]) < 10 for i in got) == 5


def test_source_balanced_exact_counts():
    assert source_quotas("source_balanced", [5, 50, 100], 60).tolist() == [5, 27, 28]
    ids = [f"r{i}" for i in range(155)]
    sources = ["c"] * 100 + ["b"] * 50 + ["a"] * 5
    got = select("source_balanced", ids, 60, 3, sources=sources)
    counts = {s: sum(sources[int(i[1:])] == s for i in got) for s in "abc"}
    assert counts == {"a": 5, "b": 27, "c": 28}
    assert select("source_balanced", ids, 60, 3, sources=sources) == got


def _noisy_losses():
    """Cluster 0: 100 rows learned (2.0 -> 0.5); cluster 1: 100 easy rows (0.3 -> 0.2);
    cluster 2: 10 rows never learned (3.0 -> 2.9)."""
    labels = np.repeat([0, 1, 2], [100, 100, 10])
    start = np.array([2.0, 0.3, 3.0])[labels]
    end = np.array([0.5, 0.2, 2.9])[labels]
    losses = np.linspace(start, end, 5, axis=1)  # (210, 5)
    return labels, losses


def test_noisy_clusters_flags_only_the_never_learned_one():
    labels, losses = _noisy_losses()
    first, last = cluster_loss_means(labels, losses, 3)
    assert np.allclose(first, [2.0, 0.3, 3.0]) and np.allclose(last, [0.5, 0.2, 2.9])
    assert noisy_clusters(first, last, [100, 100, 10], 0.5).tolist() == [False, False, True]
    # nothing learns: no yardstick, nothing flagged
    assert not noisy_clusters(first, first, [100, 100, 10], 0.5).any()


def test_noise_cap_exact_counts_and_base_rate():
    labels, losses = _noisy_losses()
    ids = [f"r{i:03d}" for i in range(210)]
    _, plain = s2l_groups(labels, 60)
    assert plain.tolist() == [25, 25, 10, 0]  # Algorithm 1 takes the noise cluster whole
    _, capped = s2l_groups(labels, 60, losses=losses, noise_drop_ratio=0.5)
    # base rate: floor(60 x 10 / 210) = 2; the 8 freed flow to the others: 29 + 29
    assert capped.tolist() == [29, 29, 2, 0]
    got = select("s2l", ids, 60, 0, labels=labels, losses=losses, noise_drop_ratio=0.5)
    noise = sum(labels[int(i[1:])] == 2 for i in got)
    assert noise == 2 <= 60 * 10 / 210


def test_never_learned_cluster_at_most_base_rate_for_any_budget():
    labels, losses = _noisy_losses()
    for b in range(1, 211):
        _, q = s2l_groups(labels, b, losses=losses, noise_drop_ratio=0.5)
        assert int(q.sum()) == b
        assert q[2] <= b * 10 / 210  # never above what uniform sampling would give it
        assert q[2] >= (b * 10 // 210 if b >= 30 else 0)  # and, once 25+ fit, exactly that
    _, q = s2l_groups(labels, 210, losses=losses, noise_drop_ratio=0.5)
    assert q[2] == 10


def test_caps_top_up_when_capped_cells_cannot_spend_the_budget():
    # nearly all the data capped: the rest is spread beyond the caps, the total stays exact
    sizes = [100, 100, 5]
    caps = base_rate_caps(sizes, np.array([True, True, False]), 150, 205)
    assert caps.tolist() == [73, 73, 5]  # eff 151 >= 150: no top-up yet
    _, q = s2l_plan(sizes, 150, caps=caps)
    assert q.tolist() == [72, 73, 5, 0]
    _, q = s2l_plan(sizes, 150, caps=[10, 10, 5])
    # eff 25: 10, 10, 5; the other 125 over the spare 90, 90: 62, 63
    assert q.tolist() == [72, 73, 5, 0]


def test_caps_with_per_source_and_tiny():
    # two sources; the noise cell (source 1) is capped, its freed share stays in the plan
    sizes = [40, 40, 12, 1]
    src = [0, 1, 1, 1]
    caps = base_rate_caps(sizes, np.array([False, False, True, False]), 30, 93)
    assert caps.tolist() == [40, 40, 3, 1]  # floor(30 x 12 / 93) = 3
    _, q = s2l_plan(sizes, 30, cell_source=src, tiny=1, caps=caps)
    # sources (eff) 40 and 44: 15 each; source 1: cells 12 (cap 3) and 40: 3, 12; pool 0
    assert q.tolist() == [15, 12, 3, 0, 0, 0]


def test_marks_tables_on_a_hand_built_table():
    import json

    from s2l_ray.stages.results import (
        marks_from_raw,
        mean_table,
        per_kind_accuracy,
        subset_composition,
    )

    raws = [json.dumps({"instruction": "q", "metadata": {"kind": k, "wrong": w}})
            for k, w in [("add", False), ("add", True), ("mul", False), ("mul", False)]]
    raws.append(json.dumps({"instruction": "no marks"}))
    ids = ["a", "b", "c", "d", "e"]
    # The demo's rows carry kind/wrong at the top level (the default keys); dotted keys reach
    # nested fields.
    marks = marks_from_raw(ids, raws, kind_key="metadata.kind", wrong_key="metadata.wrong")
    top = [json.dumps({"kind": "add", "wrong": True}), json.dumps({"instruction": "x"})]
    assert marks_from_raw(["p", "q"], top) == {"p": ("add", True), "q": (None, None)}
    assert marks == {"a": ("add", False), "b": ("add", True), "c": ("mul", False),
                     "d": ("mul", False), "e": (None, None)}
    comp = subset_composition(["b", "c", "e"], marks)
    assert comp == {"rows": 3, "wrong": 1, "wrong_marked": 2, "wrong_share": 0.5,
                    "kinds": {"(unmarked)": 1, "add": 1, "mul": 1}}
    assert subset_composition(["e"], marks)["wrong_share"] is None
    with pytest.raises(ValueError, match="no marks"):
        subset_composition(["zz"], marks)
    assert per_kind_accuracy(["a", "b", "c", "d", "e"], [True, False, True, True, True],
                             marks) == {"add": 0.5, "mul": 1.0}
    # top-level keys work too
    assert marks_from_raw(["x"], ['{"kind": "k", "wrong": 1}'], "kind", "wrong") == {
        "x": ("k", True)}
    rows = [{"size": 2, "budget": "0.1", "method": "s2l", "kind_em/add": 0.5},
            {"size": 2, "budget": "0.1", "method": "s2l", "kind_em/add": 1.0}]
    assert "| 0.1 | s2l | 0.75 |" in mean_table(rows, "kind_em/", "t")
    assert "no `wrong*` values" in mean_table(rows, "wrong", "t")


def test_official_settings_load():
    from s2l_ray.config import OFFICIAL_S2L, load_config

    cfg = load_config(None, list(OFFICIAL_S2L))
    assert cfg.cluster.per_source and cfg.cluster.train_sample_per_centroid == 256
    assert cfg.cluster.nan_losses == "zero" and cfg.select.tiny_cluster_size == 2
    assert (cfg.cluster.k, cfg.cluster.max_iter, cfg.cluster.tol) == (100, 20, 0)


def test_sweep_variants_force_the_noise_cap():
    from s2l_ray.config import ConfigError, load_config
    from s2l_ray.stages.sweep import trial_select

    cfg = load_config(None, ["sweep.methods=[s2l_cap,s2l_nocap,source_balanced]",
                             "select.tiny_cluster_size=2"])
    on, off = trial_select(cfg, "s2l_cap", 0.1), trial_select(cfg, "s2l_nocap", 0.2)
    assert (on.method, on.noise_cap, on.budget, on.tiny_cluster_size) == ("s2l", True, 0.1, 2)
    assert (off.method, off.noise_cap, off.budget) == ("s2l", False, 0.2)
    assert trial_select(cfg, "source_balanced", 5).method == "source_balanced"
    with pytest.raises(ConfigError, match="s2l_cap"):
        load_config(None, ["sweep.methods=[s2l_capped]"])
