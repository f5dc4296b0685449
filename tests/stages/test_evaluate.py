"""Evaluation: answer extraction on malformed generations, exact-match tables, and the model
path checked against references (HF's loss on one-example batches; unbatched generation)."""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from s2l_ray.config import EvalConfig
from s2l_ray.stages.evaluate import answer_of, evaluate_model, exact_match_table, generate


@pytest.mark.parametrize("text, expected", [
    ("14 + 9 = 23. The answer is 23.", "23"),
    ("The answer is 3.50", "3.5"),
    ("The answer is 6/8.", "3/4"),
    ("The answer is 1,200 apples", "1200"),
    ("The answer is -7", "-7"),
    ("x = 4. The answer is x = 4", "4"),
    # several numbers: the first after the LAST "answer is"
    ("The answer is 3 or maybe 4", "3"),
    ("The answer is 2. Wait. The answer is 5. 6 7 8", "5"),
    # no answer at all
    ("", None),
    ("I do not know", None),
    ("12 + 5 = 17", None),  # numbers but never "answer is": no credit for guessing
    ("The answer is", None),  # generation cut off
    ("The answer is . 5", None),
    ("The answer is 1/0", None),  # no such number
    ("The answer is 4. The answer is", None),  # the last statement has no number
    ("\x00\ufffd garbage The answer is\n", None),
    ("answer is answer is answer is 9", "9"),
    (None, None),
])
def test_answer_of_handles_malformed_generations(text, expected):
    assert answer_of(text) == expected


def test_exact_match_table_per_source_and_macro():
    sources = ["a", "a", "a", "a", "b", "b", None, "c"]
    refs = ["1", "2", "3", "4", "5", "6", "7", None]
    preds = ["1", "2", "0", None, "5", "6", "7", "9"]
    t = exact_match_table(sources, refs, preds)
    assert t["per_source"] == {"(none)": 1.0, "a": 0.5, "b": 1.0}
    assert t["macro_em"] == pytest.approx((0.5 + 1.0 + 1.0) / 3)
    assert t["micro_em"] == pytest.approx(5 / 7)
    assert (t["scored"], t["unscored"], t["no_answer"]) == (7, 1, 1)  # "c" has no reference
    assert t["counts"]["a"] == {"n": 4, "correct": 2, "no_answer": 1}


def test_exact_match_table_empty():
    t = exact_match_table([], [], [])
    assert math.isnan(t["macro_em"]) and math.isnan(t["micro_em"]) and t["scored"] == 0


@pytest.fixture(scope="module")
def eval_set(tiny_ref, tiny_tokenizer, tmp_path_factory):
    """An eval folder in the sweep's format, from a few mathmix test rows."""
    from s2l_ray.core.tokens import tokenize_batch
    from s2l_ray.demo.data import generate_mathmix

    _, rows = generate_mathmix(n_train=7, n_test_per_source=2, seed=3)
    tk = tokenize_batch(tiny_tokenizer, [r["instruction"] + "\n" for r in rows],
                        [r["output"] for r in rows], max_length=192)
    d = tmp_path_factory.mktemp("eval")
    pq.write_table(pa.table({
        "id": [f"e{i}" for i in range(len(rows))], "source": [r["source"] for r in rows],
        "prompt": [r["instruction"] for r in rows], "response": [r["output"] for r in rows],
        "input_ids": pa.array(tk.input_ids, pa.list_(pa.int32())),
        "n_prompt_tokens": pa.array(tk.n_prompt, pa.int32()),
        "reference": [answer_of(r["output"]) for r in rows]}), d / "examples.parquet")
    return d


def test_evaluate_model_loss_matches_hf_one_example_batches(tiny_ref, eval_set):
    import torch
    from transformers import AutoModelForCausalLM

    from s2l_ray.core.tokens import labels_for

    e = EvalConfig(max_new_tokens=8, batch_size=4, batch_tokens=256)
    metrics, preds = evaluate_model(tiny_ref, str(eval_set), e)
    table = pq.read_table(eval_set / "examples.parquet")
    model = AutoModelForCausalLM.from_pretrained(tiny_ref, dtype=torch.float32).eval()
    ref, weights = [], []
    with torch.no_grad():
        for ids, k in zip(table["input_ids"].to_pylist(), table["n_prompt_tokens"].to_pylist()):
            out = model(input_ids=torch.tensor([ids]), labels=torch.tensor([labels_for(ids, k)]))
            ref.append(float(out.loss))
            weights.append(len(ids) - max(k, 1))
    np.testing.assert_allclose(preds["loss"].to_numpy(), ref, rtol=1e-4, atol=1e-5)
    assert metrics["eval_loss"] == pytest.approx(np.average(ref, weights=weights), rel=1e-4)
    assert metrics["eval_ppl"] == pytest.approx(math.exp(metrics["eval_loss"]), rel=1e-6)
    sources = table["source"].to_pylist()
    for src in set(sources):  # per-source loss: token-weighted over that source's rows
        rows = [i for i, s in enumerate(sources) if s == src]
        assert metrics[f"loss/{src}"] == pytest.approx(
            np.average([ref[i] for i in rows], weights=[weights[i] for i in rows]), rel=1e-4)
    assert metrics["macro_loss"] == pytest.approx(
        np.mean([metrics[f"loss/{s}"] for s in set(sources)]), rel=1e-6)
    # an untrained model answers nothing right, and every example is scored
    assert metrics["scored"] == table.num_rows and 0.0 <= metrics["macro_em"] <= 1.0
    assert preds.column_names == ["id", "source", "reference", "generation", "answer",
                                  "correct", "loss"]
    assert set(k for k in metrics if k.startswith("em/")) == {
        f"em/{s}" for s in table["source"].to_pylist()}


def test_batched_left_padded_generation_equals_one_at_a_time(tiny_ref, eval_set):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_ref, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(tiny_ref)
    t = pq.read_table(eval_set / "examples.parquet")
    prompts = [ids[:k] for ids, k in zip(t["input_ids"].to_pylist(),
                                          t["n_prompt_tokens"].to_pylist())]
    assert len({len(p) for p in prompts}) > 1  # the batch really needs padding
    pad, eos = tok.pad_token_id, tok.eos_token_id
    batched = generate(model, prompts, 12, 8, pad, eos, "cpu")
    single = [generate(model, [p], 12, 1, pad, eos, "cpu")[0] for p in prompts]
    assert batched == single
    assert all(len(g) <= 12 and eos not in g for g in batched)
