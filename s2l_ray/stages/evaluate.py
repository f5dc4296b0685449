"""Held-out evaluation of a fine-tuned model: loss/perplexity and greedy exact match.

    data.eval_source (any ingestion format) --same parsing + tokenization as training-->
        <stage>/eval/examples.parquet  (id, source, input_ids, n_prompt_tokens, reference)
    model + that table --> metrics {eval_loss, eval_ppl, macro_em, micro_em, em/<source>, ...}
                           + predictions (id, source, reference, generation, answer, correct, loss)

The scoring (`answer_of`, `exact_match_table`) is pure and takes lists; `evaluate_model` is the
one function that touches a model, and runs wherever it is called (a Ray task in the sweep).
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any

import numpy as np

from s2l_ray.config import ConfigError, EvalConfig, S2LConfig

log = logging.getLogger(__name__)
NONE = "(none)"  # how a missing source is named


def answer_of(text: str | None) -> str | None:
    """The canonical final answer of a response or a generation ("The answer is X"), or None.

    Strict on purpose: a generation that never says "answer is" has no answer, even if it has
    numbers (guessing the last number would credit rambling). With several numbers after the
    last "answer is", the first one is the answer; "1/0", "The answer is." and empty text are
    None.
    """
    from s2l_ray.demo.data import extract_final_answer

    return extract_final_answer(text) if isinstance(text, str) else None


def exact_match_table(sources: list[str | None], references: list[str | None],
                      predictions: list[str | None]) -> dict[str, Any]:
    """Exact match per source, micro (over examples) and macro (mean over sources).

    Examples without a reference answer are not scored (counted as `unscored`); a prediction of
    None (no answer found) counts as wrong and is counted in `no_answer`.
    """
    per: dict[str, dict[str, int]] = {}
    unscored = 0
    for src, ref, pred in zip(sources, references, predictions):
        if ref is None:
            unscored += 1
            continue
        s = per.setdefault(src or NONE, {"n": 0, "correct": 0, "no_answer": 0})
        s["n"] += 1
        s["correct"] += int(pred is not None and pred == ref)
        s["no_answer"] += int(pred is None)
    acc = {k: v["correct"] / v["n"] for k, v in sorted(per.items())}
    n = sum(v["n"] for v in per.values())
    return {"macro_em": float(np.mean(list(acc.values()))) if acc else float("nan"),
            "micro_em": sum(v["correct"] for v in per.values()) / n if n else float("nan"),
            "per_source": acc, "counts": dict(sorted(per.items())), "scored": n,
            "unscored": unscored,
            "no_answer": sum(v["no_answer"] for v in per.values())}


def source_losses(sources: list[str | None], losses: np.ndarray,
                  n_terms: np.ndarray) -> dict[str, float]:
    """Token-weighted mean response loss per source: the continuous twin of per-source accuracy,
    and the one that still separates methods when every accuracy is at the floor."""
    sums: dict[str, list[float]] = {}
    for src, loss, k in zip(sources, losses, n_terms):
        acc = sums.setdefault(src or NONE, [0.0, 0.0])
        acc[0] += float(loss) * int(k)
        acc[1] += int(k)
    return {k: v[0] / v[1] for k, v in sorted(sums.items()) if v[1] > 0}


def eval_source_of(cfg: S2LConfig, ingest_dir: Path) -> tuple[str, str]:
    """(source, split) of the held-out data; the demo's test split (written by ingest into
    `ingest_dir`) when nothing is given."""
    if cfg.data.eval_source:
        return cfg.data.eval_source, cfg.eval.split
    if cfg.data.source == "demo:mathmix":
        return str(Path(ingest_dir) / "demo_data" / "test.jsonl"), cfg.eval.split
    raise ConfigError("config key 'data.eval_source': is not set, and evaluating the target "
                      "needs held-out data. Fix: point data.eval_source at a held-out file or "
                      "folder (any ingestion format), or 'hf:NAME' with eval.split")


def prepare_eval_set(cfg: S2LConfig, ingest_dir: Path, out_dir: Path) -> dict[str, Any]:
    """Read, validate and tokenize the held-out data exactly as the training data is.

    Writes out_dir/examples.parquet (and rejects.parquet); returns the counts. Ray must be up.
    """
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from s2l_ray.io.readers import read_raw
    from s2l_ray.stages.base import read_report
    from s2l_ray.stages.ingest import normalize_batch

    source, split = eval_source_of(cfg, ingest_dir)
    tok_path = read_report(ingest_dir)["tokenizer"]
    rows = read_raw(source, split).map_batches(
        normalize_batch, batch_format="pyarrow", batch_size=1024,
        fn_kwargs={"tokenizer_path": tok_path, "data_cfg": vars(cfg.data),
                   "trust_remote_code": cfg.reference.trust_remote_code}).to_arrow_refs()
    import ray

    table = pa.concat_tables(ray.get(rows))
    bad = pc.is_valid(table["reject_reason"])
    rejects = table.filter(bad)
    good = table.filter(pc.invert(bad)).sort_by("id")
    seen: set[str] = set()
    keep = []  # a held-out id seen twice is scored once
    for i, id_ in enumerate(good["id"].to_pylist()):
        if id_ not in seen:
            seen.add(id_)
            keep.append(i)
    dupes = good.num_rows - len(keep)
    good = good.take(keep)
    if cfg.eval.max_examples is not None:
        good = good.slice(0, cfg.eval.max_examples)
    if good.num_rows == 0:
        raise ConfigError(f"config key 'data.eval_source': '{source}' has no valid rows "
                          f"({table.num_rows} read). Fix: check its format and fields")
    refs = [answer_of(r) for r in good["response"].to_pylist()]
    out_dir.mkdir(parents=True, exist_ok=True)
    pq.write_table(good.select(["id", "source", "prompt", "response", "input_ids",
                                "n_prompt_tokens"]).append_column(
        "reference", pa.array(refs, pa.string())), out_dir / "examples.parquet")
    if rejects.num_rows:
        pq.write_table(rejects.select(["origin_file", "origin_row", "reject_reason",
                                       "reject_detail", "raw"]), out_dir / "rejects.parquet")
    reasons: dict[str, int] = {}
    for r in rejects["reject_reason"].to_pylist():
        reasons[r] = reasons.get(r, 0) + 1
    report = {"source": source, "split": split, "rows": table.num_rows,
              "examples": good.num_rows, "with_answer": sum(r is not None for r in refs),
              "duplicates": dupes, "rejects": reasons}
    for reason, n in sorted(reasons.items()):
        log.warning("eval set: rejected %d rows: %s (see %s)", n, reason, out_dir)
    log.info("eval set: %d examples (%d with a final answer) from %s", good.num_rows,
             report["with_answer"], source)
    return report


def generate(model: Any, prompts: list[list[int]], max_new_tokens: int, batch_size: int,
             pad_id: int, eos_id: int, device: Any) -> list[list[int]]:
    """Greedy continuations (token ids, cut at eos) of each prompt, in the input order.

    Prompts are left-padded in length-sorted batches so little compute goes to padding.
    """
    import torch

    order = np.argsort([len(p) for p in prompts], kind="stable")
    out: list[list[int]] = [[] for _ in prompts]
    for s in range(0, len(order), batch_size):
        idx = order[s:s + batch_size]
        width = max(len(prompts[i]) for i in idx)
        ids = torch.full((len(idx), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        for row, i in enumerate(idx):
            p = prompts[i]
            ids[row, width - len(p):] = torch.as_tensor(p)
            mask[row, width - len(p):] = 1
        with torch.inference_mode():
            gen = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                                 max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=pad_id, eos_token_id=eos_id)  # (B, width + new)
        for row, i in enumerate(idx):
            new = gen[row, width:].tolist()
            out[i] = new[:new.index(eos_id)] if eos_id in new else new
    return out


def evaluate_model(model_path: str, eval_path: str, e: EvalConfig,
                   trust_remote_code: bool = False) -> tuple[dict[str, Any], Any]:
    """(metrics, predictions table) of the model at `model_path` on eval_path/examples.parquet."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq
    import torch
    from transformers import AutoTokenizer

    from s2l_ray.core.losses import autocast_dtype, score_sorted
    from s2l_ray.models.loading import load_causal_lm

    on_gpu = torch.cuda.is_available() and e.use_gpu is not False
    device = torch.device("cuda" if on_gpu else "cpu")
    if not on_gpu:
        torch.set_num_threads(max(1, int(e.cpus)))
    t0 = time.time()
    model = load_causal_lm(model_path, trust_remote_code=trust_remote_code,
                           fix="the fine-tuned target is damaged; delete its trial folder "
                               "(sweep work folder, trials/<trial>) and rerun `s2l sweep`"
                           ).to(device)
    tok = AutoTokenizer.from_pretrained(model_path, trust_remote_code=trust_remote_code)
    table = pq.read_table(Path(eval_path) / "examples.parquet")
    n = table.num_rows
    # held-out loss: the trajectories' exact per-example loss, scored in length order
    lengths = pc.list_value_length(table["input_ids"]).to_numpy()
    order = np.lexsort((np.arange(n), lengths))
    sorted_ids = table["input_ids"].take(pa.array(order))
    losses, n_terms, _ = score_sorted(
        [model], pc.list_flatten(sorted_ids).to_numpy(), lengths[order],
        table["n_prompt_tokens"].to_numpy()[order], e.batch_tokens, device,
        autocast_dtype("auto", on_gpu))
    per_loss = np.empty(n, np.float32)
    per_loss[order] = losses[:, 0]
    terms = np.empty(n, np.int64)
    terms[order] = n_terms
    mean_loss = float((per_loss * terms).sum() / max(1, terms.sum()))  # token-weighted
    sources = table["source"].to_pylist()
    by_source = source_losses(sources, per_loss, terms)
    metrics: dict[str, Any] = {"eval_loss": mean_loss,
                               "eval_ppl": math.exp(min(mean_loss, 50.0)),
                               "macro_loss": float(np.mean(list(by_source.values()))),
                               "eval_examples": n,
                               **{f"loss/{k}": v for k, v in by_source.items()}}
    texts: list[str | None] = [None] * n
    answers: list[str | None] = [None] * n
    refs = table["reference"].to_pylist()
    if e.generate:
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        prompts = [list(ids[:k]) for ids, k in zip(table["input_ids"].to_pylist(),
                                                  table["n_prompt_tokens"].to_pylist())]
        gens = generate(model, prompts, e.max_new_tokens, e.batch_size, pad, tok.eos_token_id,
                        device)
        texts = [tok.decode(g, skip_special_tokens=True) for g in gens]
        answers = [answer_of(t) for t in texts]
        em = exact_match_table(sources, refs, answers)
        metrics.update({k: em[k] for k in ("macro_em", "micro_em", "scored", "no_answer")})
        metrics.update({f"em/{src}": acc for src, acc in em["per_source"].items()})
    metrics["eval_seconds"] = time.time() - t0
    preds = pa.table({
        "id": table["id"], "source": table["source"], "reference": table["reference"],
        "generation": pa.array(texts, pa.string()), "answer": pa.array(answers, pa.string()),
        "correct": pa.array([a is not None and a == r for a, r in zip(answers, refs)]),
        "loss": pa.array(per_loss, pa.float32())})
    return metrics, preds
