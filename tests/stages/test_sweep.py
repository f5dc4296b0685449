"""A tiny Ray Tune sweep, end to end on a local Ray: 2 methods x 2 budgets x 1 seed, each trial a
real Ray Train + DeepSpeed fine-tune and a real evaluation; then the table and every plot."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from s2l_ray.config import ConfigError, load_config
from s2l_ray.core.selection import resolve_budget
from s2l_ray.demo.data import KINDS
from s2l_ray.stages.registry import run_stage
from s2l_ray.stages.report import make_report
from tests.conftest import copy_upstream, overrides

pytestmark = [pytest.mark.ray, pytest.mark.e2e, pytest.mark.slow]
BUDGETS = [45]  # a count; fractions and the full-data trials: tests/stages/test_results.py


def _overrides(model: str, out: Path) -> list[str]:
    # both trials at once, as the demo runs them (2 x 0.5 CPU of training)
    return overrides(out, model, "sweep.methods=[s2l,random]", f"sweep.budgets={BUDGETS}",
                     "sweep.seeds=[0]", "sweep.max_concurrent_trials=2")


@pytest.fixture(scope="module")
def swept(tmp_path_factory: pytest.TempPathFactory, upstream, tiny_ref: str):
    out = copy_upstream(upstream, tmp_path_factory.mktemp("sweep") / "out")
    cfg = load_config(None, _overrides(tiny_ref, out))
    return cfg, run_stage(cfg, "sweep")


def test_sweep_writes_one_row_per_trial(swept) -> None:
    _, stage = swept
    table = pq.read_table(stage.path / "results.parquet").to_pylist()
    assert sorted(r["trial"] for r in table) == sorted(
        f"{m}-b{b}-s0" for m in ("s2l", "random") for b in ("45",))
    csv = (stage.path / "results.csv").read_text().splitlines()
    assert len(csv) == 1 + 2 and csv[0].startswith("trial,method,budget")
    for r in table:  # every trial trained and was evaluated
        assert r["steps"] >= 1 and r["eval_examples"] == len(KINDS) * 3
        assert 0.0 <= r["macro_em"] <= 1.0 and r["eval_loss"] > 0
        assert r["eval_loss"] < 6.5  # log(512) = 6.24 is chance level: it learned something
    summary = (stage.path / "summary.md").read_text()
    assert summary.count("| s2l |") == 1 and summary.count("| random |") == 1


def test_each_trial_trains_on_exactly_its_budget(swept) -> None:
    cfg, stage = swept
    n = json.loads((Path(cfg.run.output_dir) / "ingest" / "report.json").read_text())["valid"]
    examples = pq.read_table(Path(cfg.run.output_dir) / "ingest" / "examples",
                             columns=["id"])["id"].to_pylist()
    for d in sorted((stage.path / "trials").iterdir()):
        spec = json.loads((d / "trial.json").read_text())
        budget = resolve_budget(spec["budget"], n)
        selected = pq.read_table(d / "selection" / "selected.parquet")["id"].to_pylist()
        subset = pq.read_table(d / "subset.parquet")["id"].to_pylist()
        assert len(selected) == len(set(selected)) == budget == spec["size"]
        assert sorted(subset) == sorted(selected) and set(subset) <= set(examples)
        result = json.loads((d / "result.json").read_text())
        plan = spec["plan"]
        assert plan["n_examples"] == budget and result["steps"] == plan["total_steps"]
        assert (d / "model" / "config.json").is_file()  # the final checkpoint, HF format
        assert any((d / "model").glob("*.safetensors"))
        assert pq.read_table(d / "predictions.parquet").num_rows == len(KINDS) * 3
        assert not (d / "ray_train").exists()  # optimizer states dropped after the trial
    # the same budget spent by different methods picks different examples
    s2l = set(pq.read_table(stage.path / "trials" / "s2l-b45-s0" / "subset.parquet")["id"]
              .to_pylist())
    rnd = set(pq.read_table(stage.path / "trials" / "random-b45-s0" / "subset.parquet")["id"]
              .to_pylist())
    assert s2l != rnd


def test_report_writes_every_plot(swept) -> None:
    cfg, _ = swept
    written = make_report(cfg.run.output_dir)
    names = sorted(p.name for p in written)
    assert names == ["accuracy_vs_budget.png", "cluster_sizes.png", "cluster_trajectories.png",
                     "source_share.png"]
    for p in written:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 10_000
    index = (Path(cfg.run.output_dir) / "report" / "index.md").read_text()
    assert "accuracy_vs_budget.png" in index and "| s2l |" in index


def test_rerun_skips_the_finished_sweep(swept) -> None:
    cfg, stage = swept
    before = (stage.path / "_SUCCESS.json").read_text()
    run_stage(cfg, "sweep")
    assert (stage.path / "_SUCCESS.json").read_text() == before


def test_impossible_trial_fails_before_any_training(swept, tmp_path: Path) -> None:
    cfg, _ = swept
    # 1% of 300 is 3 examples: less than one step of 2 workers x batch 8
    bad = load_config(None, [*_overrides(cfg.target.model, Path(cfg.run.output_dir)),
                             "sweep.budgets=[0.01]", "run.overwrite=true"])
    with pytest.raises(ConfigError, match="target.batch_size"):
        run_stage(bad, "sweep")
    assert not (Path(cfg.run.output_dir) / ".sweep.tmp").exists()
