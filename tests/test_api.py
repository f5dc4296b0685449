"""The Python API (s2l_ray.api): config loading in every form, reading a run's outputs, the
in-memory `select` (equal to the pipeline's cluster + select stages), and the README's example,
run exactly as written."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from s2l_ray import api
from s2l_ray.config import ConfigError

REPO = Path(__file__).resolve().parents[1]


def readme_python_example() -> str:
    text = (REPO / "README.md").read_text(encoding="utf-8")
    section = text[text.index("### From Python"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_load_every_form(tmp_path: Path) -> None:
    by_name = api.load("demo", {"select.budget": 0.2, "sweep.methods": ["s2l", "el2n"]})
    assert by_name.select.budget == 0.2 and by_name.sweep.methods == ["s2l", "el2n"]
    assert by_name.reference.model == api.load("demo").reference.model
    yml = tmp_path / "my.yaml"
    yml.write_text("select:\n  budget: 50\ncluster:\n  k: 7\n")
    by_path = api.load(yml, ["cluster.k=9"])
    assert (by_path.select.budget, by_path.cluster.k) == (50, 9)
    by_dict = api.load({"cluster": {"k": 3}}, {"run.output_dir": str(tmp_path / "o")})
    assert by_dict.cluster.k == 3 and by_dict.run.output_dir == str(tmp_path / "o")
    again = api.load(by_dict, {"cluster.k": 4})
    assert again.cluster.k == 4 and by_dict.cluster.k == 3  # a copy, the input unchanged
    assert api.load().cluster.k == 100
    with pytest.raises(ConfigError, match=r"'cluster.kk'.*did you mean 'cluster.k'"):
        api.load({"cluster": {"kk": 3}})
    with pytest.raises(ConfigError, match="neither a file nor a packaged config"):
        api.load("no-such-config")
    with pytest.raises(ConfigError, match="unknown stage 'selekt'"):
        api.Run(by_name).path("selekt")


def _clustered(n_per: list[int], t: int = 4, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centers = rng.normal(0, 3, (len(n_per), t))
    return np.concatenate([c + 0.05 * rng.normal(size=(m, t)) for c, m in zip(centers, n_per)])


def test_select_spends_the_budget_over_clusters() -> None:
    sizes = [5, 40, 80, 120]
    losses = _clustered(sizes)
    sel = api.select(losses, budget=60, k=4, seed=3)
    assert len(sel.ids) == len(set(sel.ids)) == 60 and len(sel.indices) == 60
    assert sel.ids == [str(i) for i in sel.indices]
    assert sorted(sel.cluster_sizes.tolist()) == sizes  # well-separated: k-means finds them
    assert sel.taken.sum() == 60 and (sel.taken <= sel.cluster_sizes).all()
    small = int(np.argmin(sel.cluster_sizes))
    assert sel.taken[small] == 5  # the smallest cluster is taken whole: 60 / 4 > 5
    assert sorted(sel.taken.tolist()) == [5, 18, 18, 19]
    assert np.array_equal(np.bincount(sel.labels[sel.indices], minlength=4), sel.taken)
    # deterministic, and another seed picks other rows inside the clusters
    assert api.select(losses, budget=60, k=4, seed=3).ids == sel.ids
    assert api.select(losses, budget=60, k=4, seed=4).ids != sel.ids
    frac = api.select(losses, budget=0.1, k=4, seed=3, ids=[f"x{i}" for i in range(245)])
    assert len(frac.ids) == 25 and all(i.startswith("x") for i in frac.ids)


def test_select_baselines_and_errors() -> None:
    losses = _clustered([30, 30])
    top = api.select(losses, budget=5, method="least_confidence")
    assert sorted(top.indices.tolist()) == sorted(np.argsort(-losses[:, -1])[:5].tolist())
    assert top.labels is None and top.taken is None
    strat = api.select(losses, budget=10, method="stratified", sources=["a"] * 20 + ["b"] * 40)
    assert sorted(np.array(["a"] * 20 + ["b"] * 40)[strat.indices]).count("a") == 3
    with pytest.raises(ValueError, match=r"\(n, T\)"):
        api.select(np.zeros(5), budget=2)
    with pytest.raises(ValueError, match="3 ids for 60 rows"):
        api.select(losses, budget=2, ids=["a", "b", "c"])
    with pytest.raises(ValueError, match="more than the 60 examples"):
        api.select(losses, budget=61, k=2)
    with pytest.raises(ValueError, match="NaN or infinite"):
        api.select(np.full((10, 3), np.nan), budget=2, k=2)


@pytest.mark.ray
def test_run_outputs_and_select_equal_the_pipeline(small_run) -> None:
    cfg = small_run
    run = api.run_pipeline(cfg, until="select")  # every stage current: nothing reruns
    assert run.report("select")["seconds"] == api.open_run(cfg).report("select")["seconds"]
    reopened = api.open_run(cfg.run.output_dir)
    assert reopened.cfg.cluster.k == cfg.cluster.k and reopened.selected_ids == run.selected_ids
    assert run.path("train-ref") == run.path("train_ref") == Path(cfg.run.output_dir) / "train_ref"
    assert not run.done("sweep")
    with pytest.raises(FileNotFoundError, match="until='sweep'"):
        run.sweep_table()
    traj = run.trajectories()
    ids = traj["id"].to_pylist()
    losses = np.array(traj["losses"].to_pylist())
    sel = api.select(losses, budget=cfg.select.budget, k=cfg.cluster.k, seed=cfg.run.seed,
                     ids=ids)
    assert sel.ids == run.selected_ids  # same ids, in the same order
    assert sel.taken.tolist() == run.report("select")["clusters"]["after"]
    labels = dict(zip(*(run.assignments()[c].to_pylist() for c in ("id", "cluster"))))
    assert [labels[i] for i in ids] == sel.labels.tolist()


@pytest.mark.ray
@pytest.mark.slow
def test_readme_python_example_runs(ray_local, tmp_path: Path,
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    code = readme_python_example()
    assert "api.run_pipeline" in code and "api.select" in code
    monkeypatch.chdir(tmp_path)  # its run.output_dir is relative
    exec(compile(code, "README.md (From Python)", "exec"), {"__name__": "readme_example"})
    out = tmp_path / "s2l_output" / "api-example"
    assert (out / "select" / "_SUCCESS.json").is_file()
    assert (out / "report" / "index.html").is_file()
