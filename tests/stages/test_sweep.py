"""The sweep stage on the session's reduced `s2l demo` run (`demo_run`, tests/conftest.py): a Ray
Tune grid of S2L and random at half the data plus the full data, 2 trials at a time as the demo
runs them, each trial a real Ray Train + DeepSpeed fine-tune and a real evaluation; then the
table, every plot, a rerun that is skipped and a grid that fails before any training. The run is
shared with tests/e2e/test_demo_e2e.py, which checks what the demo prints: each trial is a Ray
Train start, the largest fixed cost of the suite."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from s2l_ray import api
from s2l_ray.config import ConfigError
from s2l_ray.core.selection import resolve_budget
from s2l_ray.demo.data import KINDS
from s2l_ray.stages.registry import run_stage, stage_for
from s2l_ray.stages.report import make_report
from tests.conftest import DemoRun

pytestmark = [pytest.mark.ray, pytest.mark.e2e, pytest.mark.slow]
TRIALS = ["s2l-b0.5-s0", "random-b0.5-s0", "full-b1-s0"]  # conftest.DEMO_RUN's grid


@pytest.fixture(scope="module")
def swept(demo_run: DemoRun):
    assert demo_run.rc == 0, "the session's demo run failed: see test_demo_e2e"
    return demo_run.cfg, stage_for(demo_run.cfg, "sweep")


def test_sweep_writes_one_row_per_trial(swept) -> None:
    cfg, stage = swept
    table = pq.read_table(stage.path / "results.parquet").to_pylist()
    assert sorted(r["trial"] for r in table) == sorted(TRIALS)
    csv = (stage.path / "results.csv").read_text().splitlines()
    assert len(csv) == 1 + len(TRIALS) and csv[0].startswith("trial,method,budget")
    for r in table:  # every trial trained and was evaluated
        assert r["steps"] >= 1 and r["eval_examples"] == len(KINDS) * cfg.demo.n_test_per_source
        assert 0.0 <= r["macro_em"] <= 1.0 and r["eval_loss"] > 0
        assert r["eval_loss"] < 6.5  # log(512) = 6.24 is chance level: it learned something
    summary = (stage.path / "summary.md").read_text()
    assert summary.count("| s2l |") == 1 and summary.count("| random |") == 1
    assert summary.count("| full |") == 1


def test_each_trial_trains_on_exactly_its_budget(swept) -> None:
    cfg, stage = swept
    n = json.loads((Path(cfg.run.output_dir) / "ingest" / "report.json").read_text())["valid"]
    examples = pq.read_table(Path(cfg.run.output_dir) / "ingest" / "examples",
                             columns=["id"])["id"].to_pylist()
    trials = sorted((stage.path / "trials").iterdir())
    assert sorted(d.name for d in trials) == sorted(TRIALS)
    for d in trials:
        spec = json.loads((d / "trial.json").read_text())
        budget = resolve_budget(spec["budget"], n)
        assert budget == spec["size"] and spec["plan"]["n_examples"] == budget
        if spec["method"] == "full":  # the whole ingested set, as published
            assert budget == n and not (d / "selection").exists()
            assert Path(spec["subset"]) == Path(cfg.run.output_dir) / "ingest" / "examples"
        else:
            selected = pq.read_table(d / "selection" / "selected.parquet")["id"].to_pylist()
            subset = pq.read_table(d / "subset.parquet")["id"].to_pylist()
            assert len(selected) == len(set(selected)) == budget < n
            assert sorted(subset) == sorted(selected) and set(subset) <= set(examples)
        result = json.loads((d / "result.json").read_text())
        assert result["steps"] == spec["plan"]["total_steps"]
        assert (d / "model" / "config.json").is_file()  # the final checkpoint, HF format
        assert any((d / "model").glob("*.safetensors"))
        assert pq.read_table(d / "predictions.parquet").num_rows == \
            len(KINDS) * cfg.demo.n_test_per_source
        assert not (d / "ray_train").exists()  # optimizer states dropped after the trial
    # the same budget spent by different methods picks different examples
    s2l = set(pq.read_table(stage.path / "trials" / "s2l-b0.5-s0" / "subset.parquet")["id"]
              .to_pylist())
    rnd = set(pq.read_table(stage.path / "trials" / "random-b0.5-s0" / "subset.parquet")["id"]
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


def test_impossible_trial_fails_before_any_training(swept) -> None:
    cfg, _ = swept
    # 1% of the demo's 240 rows is 2 examples: less than one step of batch 16
    bad = api.load(cfg, ["sweep.budgets=[0.01]", "run.overwrite=true"])
    with pytest.raises(ConfigError, match="target.batch_size"):
        run_stage(bad, "sweep")
    assert not (Path(cfg.run.output_dir) / ".sweep.tmp").exists()
