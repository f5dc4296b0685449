"""`s2l demo` end to end at a reduced size: the packaged demo config (pre-trained tiny models,
S2L vs random at one budget here, two in the demo, and all data), then its table and the
sentence that reads it. The run is the session's `demo_run` (tests/conftest.py), whose sweep
tests/stages/test_sweep.py also checks."""

from __future__ import annotations

import json
import re

import pyarrow.parquet as pq
import pytest

from s2l_ray.demo.data import KINDS
from s2l_ray.models.tiny import cache_name
from tests.conftest import DEMO_PRETRAIN_STEPS, DemoRun, demo_models

pytestmark = [pytest.mark.ray, pytest.mark.e2e, pytest.mark.slow]


def test_demo_runs_end_to_end_and_tells_its_result(demo_run: DemoRun) -> None:
    out = demo_run.out
    assert demo_run.rc == 0
    printed = demo_run.printed
    # the last words: the table, then one sentence with every cell's macro exact match
    assert "| data | examples | seeds | macro EM |" in printed
    # one partial budget keeps the run short (each trial is a Ray Train start); the sentence
    # over two budgets is tests/stages/test_results.py::test_result_table_and_its_sentence
    sentence = re.search(r"S2L at 50%: (\d\.\d\d) macro exact match, random (\d\.\d\d); "
                         r"all data: (\d\.\d\d) \(held-out, 1 seed\)\.", printed)
    assert sentence, printed
    results = {(r["method"], r["budget"]): r for r in
               pq.read_table(out / "sweep" / "results.parquet").to_pylist()}
    cells = [("s2l", "0.5"), ("random", "0.5"), ("full", "1")]
    assert sorted(results) == sorted(cells)
    expected = [results[k]["macro_em"] for k in cells]
    assert [float(x) for x in sentence.groups()] == pytest.approx(expected, abs=0.006)
    for r in results.values():  # scored per kind: the held-out set's source is the kind
        assert {k[3:] for k in r if k.startswith("em/")} == set(KINDS)
        assert r["eval_examples"] == 2 * len(KINDS)
    # the same table heads summary.md and the report; the targets were pre-trained once
    summary = (out / "sweep" / "summary.md").read_text()
    assert summary.startswith("## Result") and sentence[0] in summary
    assert (out / "report" / "accuracy_vs_budget.png").is_file()
    built = sorted(p.name for p in (demo_run.cache / "models").iterdir())
    with demo_models(demo_run.cache):  # the names hash the (shortened) pre-training
        assert built == sorted(cache_name("tiny-pre", p) for p in ("micro", "small"))
        small = demo_run.cache / "models" / cache_name("tiny-pre", "small")
    info = json.loads((small / "pretraining.json").read_text())
    assert info["steps"] == DEMO_PRETRAIN_STEPS
