"""The sweep's grid and results table (pure)."""

from __future__ import annotations

import pytest

from s2l_ray.config import ConfigError, load_config
from s2l_ray.stages.results import (
    FULL,
    headline,
    markdown_summary,
    plan_trials,
    result_table,
    summarize,
)


def test_plan_trials_grid_and_full_data_collapse():
    trials = plan_trials(["s2l", "random"], [0.1, 250, 1.0], [0, 1], n=1000)
    names = [t.name for t in trials]
    assert names == ["s2l-b0.1-s0", "s2l-b0.1-s1", "random-b0.1-s0", "random-b0.1-s1",
                     "s2l-b250-s0", "s2l-b250-s1", "random-b250-s0", "random-b250-s1",
                     "full-b1-s0", "full-b1-s1"]
    assert {t.size for t in trials} == {100, 250, 1000}
    assert [t for t in trials if t.method == FULL] == [t for t in trials if t.size == 1000]
    # a count equal to the data size is the full data too, and is not run twice
    again = plan_trials(["s2l"], [1000, 1.0], [0], n=1000)
    assert [t.name for t in again] == ["full-b1000-s0"]


def test_plan_trials_rejects_a_budget_over_the_data():
    with pytest.raises(ConfigError, match="sweep.budgets"):
        plan_trials(["s2l"], [5000], [0], n=1000)


def test_sweep_config_checks_itself():
    with pytest.raises(ConfigError, match="sweep.methods.*unknown method 'magic'"):
        load_config(None, ["sweep.methods=[s2l,magic]"])
    with pytest.raises(ConfigError, match="sweep.seeds.*repeats"):
        load_config(None, ["sweep.seeds=[0,0]"])
    with pytest.raises(ConfigError, match="sweep.budgets"):
        load_config(None, ["sweep.budgets=[1.5]"])
    with pytest.raises(ConfigError, match="target.train_steps.*max_steps"):
        load_config(None, ["target.train_steps=100", "target.max_steps=50"])
    with pytest.raises(ConfigError, match="eval.max_new_tokens"):
        load_config(None, ["eval.max_new_tokens=0"])


def _row(method, size, seed, em, loss=2.0):
    return {"method": method, "size": size, "budget": size / 100, "fraction": size / 100,
            "seed": seed, "macro_em": em, "macro_loss": loss}


def test_summarize_mean_std_and_missing():
    rows = [_row("s2l", 10, 0, 0.5), _row("s2l", 10, 1, 0.7), _row("s2l", 10, 2, float("nan")),
            _row("random", 10, 0, 0.4), _row("random", 10, 1, 0.4),
            _row(FULL, 100, 0, 0.9, 1.0)]
    s = {(r["method"], r["size"]): r for r in summarize(rows)}
    assert s[("s2l", 10)]["macro_em_mean"] == pytest.approx(0.6)
    assert s[("s2l", 10)]["macro_em_std"] == pytest.approx(0.1414, abs=1e-4)
    assert (s[("s2l", 10)]["macro_em_seeds"], s[("s2l", 10)]["runs"]) == (2, 3)
    assert s[("s2l", 10)]["macro_loss_seeds"] == 3
    assert s[("random", 10)]["macro_em_std"] == 0.0
    assert s[(FULL, 100)]["macro_em_std"] == 0.0 and s[(FULL, 100)]["macro_em_seeds"] == 1
    md = markdown_summary(summarize(rows))
    assert ("| s2l | 2 (+1 missing) | 0.600 ± 0.141 [0.500, 0.700] | +0.200 | "
            "2.000 ± 0.000 [2.000, 2.000] | +0.000 |") in md
    assert md.count("\n| ") == 2 + 3  # header, rule, three rows


def test_sweep_without_held_out_data_fails_before_any_work(tmp_path):
    from s2l_ray.stages.registry import check_eval_source

    data = tmp_path / "train.jsonl"
    data.write_text('{"instruction": "1+1", "output": "The answer is 2"}\n')
    cfg = load_config(None, [f"data.source={data}", f"run.output_dir={tmp_path / 'out'}"])
    with pytest.raises(ConfigError, match="data.eval_source.*s2l select"):
        check_eval_source(cfg)
    missing = load_config(None, [f"data.source={data}", f"data.eval_source={tmp_path / 'no'}"])
    with pytest.raises(ConfigError, match="'data.eval_source'.*does not exist"):
        check_eval_source(missing)
    check_eval_source(load_config(None, [f"data.source={data}", f"data.eval_source={data}"]))
    check_eval_source(load_config(None, []))  # the demo brings its own test split
    assert not (tmp_path / "out").exists()


def _trial(method: str, size: int, seed: int, em: float, per_kind: dict[str, float]) -> dict:
    return {"method": method, "size": size, "fraction": size / 1000, "seed": seed,
            "budget": "1" if method == FULL else f"{size / 1000:g}", "macro_em": em,
            "macro_loss": 2 - em, **{f"em/{k}": v for k, v in per_kind.items()}}


def test_result_table_and_its_sentence():
    rows = [_trial("random", 100, s, em, {"add": em + 0.1, "half": em - 0.1})
            for s, em in ((0, 0.40), (1, 0.50))]
    rows += [_trial("s2l", 100, s, em, {"add": em, "half": em}) for s, em in ((0, 0.6), (1, 0.7))]
    rows += [_trial("s2l", 300, 0, 0.75, {"add": 0.8, "half": 0.7}),
             _trial("random", 300, 0, 0.70, {"add": 0.8, "half": 0.6}),
             _trial(FULL, 1000, 0, 0.8125, {"add": 0.9, "half": 0.725})]
    table = result_table(rows, title="Result")
    lines = table.splitlines()
    assert lines[0] == "## Result"
    assert "| data | examples | seeds | macro EM | add | half | held-out loss |" in lines
    # smallest budget first, S2L before random, all data last; mean ± std over seeds
    body = [ln for ln in lines if ln.startswith("| ") and "---" not in ln][1:]
    assert [ln.split(" | ")[0] for ln in body] == [
        "| S2L 10%", "| random 10%", "| S2L 30%", "| random 30%", "| all data"]
    assert body[0].startswith("| S2L 10% | 100 | 2 | 0.65 ± 0.07 | 0.65 ± 0.07 |")
    assert body[-1] == "| all data | 1000 | 1 | 0.81 | 0.90 | 0.72 | 1.19 |"
    sentence = ("S2L at 10%: 0.65 macro exact match, random 0.45; S2L at 30%: 0.75, random "
                "0.70; all data: 0.81 (held-out, 2 seeds).")
    assert headline(rows) == sentence and lines[-1] == sentence
    assert headline([]) == "No finished trials."
