"""`s2l demo` end to end at a reduced size: the packaged demo config (pre-trained tiny models,
S2L vs random at two budgets and all data), then its table and the sentence that reads it."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from s2l_ray.cli import main
from s2l_ray.demo.data import KINDS
from s2l_ray.models.tiny import PRETRAIN, cache_name

pytestmark = [pytest.mark.ray, pytest.mark.e2e, pytest.mark.slow]


def test_demo_runs_end_to_end_and_tells_its_result(
        tmp_path: Path, ray_local, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("S2L_RAY_CACHE", str(tmp_path / "cache"))
    for preset in PRETRAIN:  # the same pre-training, shortened: this tests the plumbing
        monkeypatch.setitem(PRETRAIN, preset, {**PRETRAIN[preset], "steps": 10})
    out = tmp_path / "demo"
    rc = main(["demo", f"run.output_dir={out}", "demo.n_train=240", "demo.n_test_per_source=2",
               "reference.epochs=1", "target.epochs=1", "reference.num_checkpoints=3",
               "cluster.k=4", "sweep.budgets=[0.25,0.5,1.0]"])
    assert rc == 0
    printed = capsys.readouterr().out
    # the last words: the table, then one sentence with every cell's macro exact match
    assert "| data | examples | seeds | macro EM |" in printed
    sentence = re.search(r"S2L at 25%: (\d\.\d\d) macro exact match, random (\d\.\d\d); "
                         r"S2L at 50%: (\d\.\d\d), random (\d\.\d\d); all data: (\d\.\d\d) "
                         r"\(held-out, 1 seed\)\.", printed)
    assert sentence, printed
    results = {(r["method"], r["budget"]): r for r in
               pq.read_table(out / "sweep" / "results.parquet").to_pylist()}
    assert sorted(results) == sorted([("s2l", "0.25"), ("random", "0.25"), ("s2l", "0.5"),
                                      ("random", "0.5"), ("full", "1")])
    expected = [results[k]["macro_em"] for k in (("s2l", "0.25"), ("random", "0.25"),
                                                 ("s2l", "0.5"), ("random", "0.5"),
                                                 ("full", "1"))]
    assert [float(x) for x in sentence.groups()] == pytest.approx(expected, abs=0.006)
    for r in results.values():  # scored per kind: the held-out set's source is the kind
        assert {k[3:] for k in r if k.startswith("em/")} == set(KINDS)
        assert r["eval_examples"] == 2 * len(KINDS)
    # the same table heads summary.md and the report; the targets were pre-trained once
    summary = (out / "sweep" / "summary.md").read_text()
    assert summary.startswith("## Result") and sentence[0] in summary
    assert (out / "report" / "accuracy_vs_budget.png").is_file()
    built = sorted(p.name for p in (tmp_path / "cache" / "models").iterdir())
    assert built == sorted(cache_name("tiny-pre", p) for p in ("micro", "small"))
    info = json.loads((tmp_path / "cache" / "models" / cache_name("tiny-pre", "small") /
                       "pretraining.json").read_text())
    assert info["steps"] == 10
