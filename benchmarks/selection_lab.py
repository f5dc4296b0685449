"""Selection lab: what makes the reference's trajectories informative (demo validation split).

A design study for the S2L defaults (issue: "find out what makes the reference's trajectories
informative beyond loss level ... set the defaults from measurements on the demo's validation
split"). Plain torch, no Ray, so that a few hundred fine-tunes fit in minutes on a laptop CPU, but
built from the pipeline's own pieces: `core.formats.to_example` and `core.tokens.tokenize_arrays`
(the prompt and loss mask), `core.schedule` (steps, checkpoint placement, the lr schedule),
`core.losses.score_sorted` (per-example response loss at each checkpoint), `core.kmeans.fit` (the
distributed k-means' exact semantics) and `core.selection.select` (every method's rule), with the
models the demo uses (`s2l_ray/configs/demo.yaml`: reference, target, epochs, lr, batch, K, T).

What it does, from demo.yaml's settings:
  1. generates the demo data (`demo.n_train` rows) and drops exact duplicates (as ingest does);
     validation is `--val-per-kind` correct rows per kind drawn from the same training stream,
     none of them among the training rows (`demo.data.validation_split`); the held-out split is
     never looked at;
  2. for each reference setting (epochs, T, checkpoint placement) fine-tunes the reference once
     and records every example's loss at the T checkpoints;
  3. for each selection setting (K, normalisation, per-source rules, noise cap, the controls)
     x budget x seed, selects a subset, fine-tunes the target on it and scores greedy exact match
     per kind on validation; also records each subset's wrong-answer share and rows per kind.
One factor changes at a time from the demo's defaults. Target fine-tunes run in `--jobs`
processes of one thread each (as a 1-CPU Ray worker trains).

    python benchmarks/selection_lab.py                          # the whole study (~15 min, 2 cores)
    python benchmarks/selection_lab.py --study base,K --seeds 0  # a quick look
    python benchmarks/selection_lab.py target.model=tiny:small   # any demo.yaml override

Writes benchmarks/results/selection_lab_<tag>.md (tables) and .json (every trial). Run it under the
CPU lock on a shared machine.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent
log = logging.getLogger("s2l_ray.lab")


@dataclass(frozen=True)
class RefSetting:
    """How the reference is trained and where its T checkpoints fall."""

    epochs: int
    checkpoints: int
    placement: str = "even"  # even | early (denser at the start, where losses move most)


@dataclass(frozen=True)
class Setting:
    """One selection rule: a reference setting, then clustering and selection options."""

    name: str
    method: str = "s2l"  # s2l | random | source_balanced | full
    ref: RefSetting | None = None
    k: int = 16
    normalize: str = "none"
    per_source: bool = False
    tiny: int = 0
    noise_cap: bool = False


def study(cfg: Any, names: set[str]) -> list[Setting]:
    """The one-factor-at-a-time grid around the demo's defaults."""
    r, k = cfg.reference, cfg.cluster.k
    base = RefSetting(r.epochs, r.num_checkpoints)
    grid: dict[str, list[Setting]] = {
        "base": [Setting("random", "random"), Setting("source_balanced", "source_balanced"),
                 Setting(f"s2l (K={k}, T={base.checkpoints}, {base.epochs} ep)", ref=base, k=k)],
        "ref_epochs": [Setting(f"s2l ref {e} ep", ref=RefSetting(e, base.checkpoints), k=k)
                       for e in sorted({1, 2 * base.epochs} - {base.epochs})],
        "T": [Setting(f"s2l T={t}", ref=RefSetting(base.epochs, t), k=k)
              for t in sorted({3, 2 * base.checkpoints} - {base.checkpoints})],
        "placement": [Setting("s2l early checkpoints",
                              ref=RefSetting(base.epochs, base.checkpoints, "early"), k=k)],
        "K": [Setting(f"s2l K={kk}", ref=base, k=kk) for kk in sorted({k // 2, 2 * k} - {k})],
        "normalize": [Setting("s2l standardized", ref=base, k=k, normalize="standardize")],
        "official": [Setting("s2l per-source (official rules)", ref=base, k=k,
                             per_source=True, tiny=2)],
        "noise_cap": [Setting("s2l + noise cap", ref=base, k=k, noise_cap=True)],
    }
    unknown = names - set(grid)
    if unknown:
        raise SystemExit(f"unknown --study {sorted(unknown)}: choose from {sorted(grid)}")
    return [s for n in grid if n in names for s in grid[n]]


# ---------------------------------------------------------------------------------------------
# data


def demo_rows(cfg: Any, val_per_kind: int) -> tuple[list[dict], list[dict]]:
    """(train rows, validation rows): the demo's training rows, deduplicated as ingest does, and
    a validation split from the same stream that none of them is in (`validation_split`)."""
    from s2l_ray.demo.data import validation_split

    return validation_split(cfg.demo.n_train, val_per_kind, cfg.demo.seed)


@dataclass
class Encoded:
    seqs: list[list[int]]  # prompt + response + eos ids, one list per row
    n_prompt: list[int]


def encode(tok: Any, rows: list[dict], cfg: Any) -> Encoded:
    from s2l_ray.core.formats import to_example
    from s2l_ray.core.tokens import tokenize_arrays

    ex = [to_example(x, template=cfg.data.template) for x in rows]
    arr = tokenize_arrays(tok, [e.prompt for e in ex], [e.response for e in ex],
                          cfg.data.max_length, cfg.data.overlong)
    bad = [e for e in arr.errors if e]
    if bad:
        raise SystemExit(f"{len(bad)} demo rows do not tokenize: {bad[:3]}")
    off = arr.offsets
    return Encoded([arr.values[off[i]:off[i + 1]].tolist() for i in range(len(rows))],
                   arr.n_prompt.tolist())


# ---------------------------------------------------------------------------------------------
# training and scoring (the pipeline's optimizer, schedule and loss)


def checkpoint_steps(total: int, t: int, placement: str) -> list[int]:
    from s2l_ray.core.schedule import even_checkpoints

    if placement == "even":
        return list(even_checkpoints(total, t))
    # early: quadratic spacing, distinct steps, the last at the end
    steps = sorted({max(1, round(total * ((i + 1) / t) ** 2)) for i in range(t)})
    return steps if len(steps) == t else list(even_checkpoints(total, t))


def finetune(model: Any, enc: Encoded, idx: np.ndarray, tc: Any, seed: int, pad_id: int,
             on_step: Any = None, steps: list[int] | None = None) -> int:
    """Train `model` on rows `idx` as the pipeline's training worker does (AdamW, clip 1.0,
    warm-up + cosine `lr_at`, a reshuffle per epoch). Returns the number of steps."""
    import torch

    from s2l_ray.core.schedule import lr_at, make_plan
    from s2l_ray.core.tokens import pad_batch

    plan = make_plan(len(idx), 1, tc.batch_size, 1, tc.epochs, tc.max_steps,
                     max(1, len(steps or [1])), steps)
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=tc.lr, betas=(0.9, 0.999), eps=1e-8,
                            weight_decay=tc.weight_decay)
    model.train()
    step = 0
    for epoch in range(plan.epochs):
        order = idx[np.random.default_rng(seed * 1009 + epoch).permutation(len(idx))]
        for s in range(0, plan.steps_per_epoch * tc.batch_size, tc.batch_size):
            if step >= plan.total_steps:
                break
            b = order[s:s + tc.batch_size]
            ids, mask, labels = pad_batch([enc.seqs[i] for i in b], [enc.n_prompt[i] for i in b],
                                          pad_id)
            for g in opt.param_groups:
                g["lr"] = lr_at(step, plan.total_steps, tc.lr, tc.warmup_ratio)
            model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            if on_step is not None:
                on_step(step)
    model.eval()
    return step


def trajectories(cfg: Any, enc: Encoded, ref: RefSetting, pad_id: int) -> np.ndarray:
    """(n, T) response losses of every training row at the reference's T checkpoints."""
    import copy

    from transformers import AutoModelForCausalLM

    from s2l_ray.core.losses import score_sorted
    from s2l_ray.core.schedule import make_plan
    from s2l_ray.models.tiny import resolve_model

    tc = copy.copy(cfg.reference)
    tc.epochs = ref.epochs
    n = len(enc.seqs)
    total = make_plan(n, 1, tc.batch_size, 1, tc.epochs, None, ref.checkpoints, None).total_steps
    steps = checkpoint_steps(total, ref.checkpoints, ref.placement)
    model = AutoModelForCausalLM.from_pretrained(resolve_model(tc.model))
    order = np.argsort([len(s) for s in enc.seqs], kind="stable")  # score_sorted wants ascending
    lengths = np.array([len(enc.seqs[i]) for i in order])
    values = np.concatenate([np.asarray(enc.seqs[i], np.int64) for i in order])
    n_prompt = np.array([enc.n_prompt[i] for i in order])
    cols: list[np.ndarray] = []

    def score(step: int) -> None:
        if step in steps:
            model.eval()
            losses, _, _ = score_sorted([model], values, lengths, n_prompt,
                                        cfg.trajectories.tokens_per_batch(False), "cpu")
            col = np.empty(n, np.float32)
            col[order] = losses[:, 0]
            cols.append(col)
            model.train()

    finetune(model, enc, np.arange(n), tc, cfg.run.seed, pad_id, on_step=score, steps=steps)
    return np.stack(cols, axis=1)


# ---------------------------------------------------------------------------------------------
# one target fine-tune + validation (a worker process, one thread)


_W: dict[str, Any] = {}


def _init_worker(cfg_args: list[str], val_per_kind: int) -> None:
    import torch
    from transformers import AutoTokenizer

    from s2l_ray.models.tiny import resolve_model

    torch.set_num_threads(1)
    cfg = load_cfg(cfg_args)
    tok = AutoTokenizer.from_pretrained(resolve_model(cfg.target.model))
    from s2l_ray.core.formats import to_example

    train, val = demo_rows(cfg, val_per_kind)
    prompts = [tok(to_example(x, template=cfg.data.template).prompt)["input_ids"] for x in val]
    _W.update(cfg=cfg, tok=tok, enc=encode(tok, train, cfg), val=val, prompts=prompts)


def target_trial(job: dict[str, Any]) -> dict[str, Any]:
    """Fine-tune the target on the job's rows, then greedy exact match per kind on validation."""
    from transformers import AutoModelForCausalLM

    from s2l_ray.demo.data import extract_final_answer
    from s2l_ray.models.tiny import resolve_model
    from s2l_ray.stages.evaluate import generate

    cfg, tok, enc, val, prompts = _W["cfg"], _W["tok"], _W["enc"], _W["val"], _W["prompts"]
    t0 = time.time()
    model = AutoModelForCausalLM.from_pretrained(resolve_model(cfg.target.model))
    steps = finetune(model, enc, np.asarray(job["rows"]), cfg.target, job["seed"],
                     tok.pad_token_id)
    gen = generate(model, prompts, cfg.eval.max_new_tokens, cfg.eval.batch_size,
                   tok.pad_token_id, tok.eos_token_id, "cpu")
    right: Counter[str] = Counter()
    count: Counter[str] = Counter()
    for x, g in zip(val, gen):
        count[x["kind"]] += 1
        pred = extract_final_answer(tok.decode(g, skip_special_tokens=True))
        right[x["kind"]] += pred is not None and pred == extract_final_answer(x["output"])
    em = {k: right[k] / count[k] for k in sorted(count)}
    return {**{k: v for k, v in job.items() if k != "rows"}, "steps": steps,
            "macro_em": float(np.mean(list(em.values()))), "em": em,
            "seconds": time.time() - t0}


# ---------------------------------------------------------------------------------------------


def load_cfg(overrides: list[str]) -> Any:
    from s2l_ray.cli import PACKAGED
    from s2l_ray.config import load_config

    return load_config(PACKAGED / "demo.yaml", ["run.output_dir=/tmp/s2l_lab", *overrides])


def cluster_labels(s: Setting, ids: list[str], sources: list[str], losses: np.ndarray,
                   cfg: Any) -> np.ndarray:
    """The cluster stage's k-means (fixed run.seed, as in a sweep: one clustering per run)."""
    from s2l_ray.core import kmeans

    _, parts = (np.unique(sources, return_inverse=True) if s.per_source else (None, None))
    return kmeans.fit(ids, losses, s.k, seed=cfg.run.seed, max_iter=cfg.cluster.max_iter,
                      normalize=s.normalize, parts=parts).labels  # type: ignore[arg-type]


def select_rows(s: Setting, budget: float, seed: int, ids: list[str], sources: list[str],
                losses: np.ndarray | None, labels: np.ndarray | None, cfg: Any) -> np.ndarray:
    from s2l_ray.core.selection import select

    if s.method == "full":
        return np.arange(len(ids))
    chosen = select(s.method, ids, budget, seed, labels=labels, sources=sources, losses=losses,
                    per_source=s.per_source, tiny=s.tiny,
                    noise_drop_ratio=cfg.select.noise_drop_ratio if s.noise_cap else None)
    pos = {i: n for n, i in enumerate(ids)}
    return np.array(sorted(pos[i] for i in chosen))


def summarize(trials: list[dict[str, Any]], kinds: list[str]) -> str:
    by: dict[tuple[str, float], list[dict]] = {}
    for t in trials:
        by.setdefault((t["setting"], t["budget"]), []).append(t)

    def mean(name: str, budget: float) -> float | None:
        v = [t["macro_em"] for t in by.get((name, budget), [])]
        return float(np.mean(v)) if v else None

    lines = ["| budget | setting | seeds | macro EM (mean ± std) | vs random | vs source_balanced"
             " | wrong share | " + " | ".join(kinds) + " |",
             "|" + " --- |" * (7 + len(kinds))]
    for (name, budget), ts in sorted(by.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        em = [t["macro_em"] for t in ts]
        sd = float(np.std(em, ddof=1)) if len(em) > 1 else 0.0
        rnd, sb = mean("random", budget), mean("source_balanced", budget)
        d = [f"{np.mean(em) - r:+.3f}" if r is not None and name != ref else ""
             for r, ref in ((rnd, "random"), (sb, "source_balanced"))]
        per = [f"{np.mean([t['em'][k] for t in ts]):.2f}" for k in kinds]
        lines.append(f"| {budget} | {name} | {len(ts)} | {np.mean(em):.3f} ± {sd:.3f} | {d[0]} "
                     f"| {d[1]} | {np.mean([t['wrong_share'] for t in ts]):.3f} | "
                     + " | ".join(per) + " |")
    return "\n".join(lines) + "\n"


def composition_table(trials: list[dict[str, Any]], kinds: list[str]) -> str:
    lines = ["| budget | setting | rows | " + " | ".join(kinds) + " |",
             "|" + " --- |" * (3 + len(kinds))]
    seen = set()
    for t in sorted(trials, key=lambda t: (t["budget"], t["setting"])):
        if (t["setting"], t["budget"]) in seen or t["seed"] != trials[0]["seed"]:
            continue
        seen.add((t["setting"], t["budget"]))
        lines.append(f"| {t['budget']} | {t['setting']} | {t['rows_n']} | "
                     + " | ".join(str(t["kinds"].get(k, 0)) for k in kinds) + " |")
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--study", default="base,ref_epochs,T,placement,K,normalize,official,"
                    "noise_cap", help="comma-separated factors to vary (base = the controls "
                    "and the demo's S2L)")
    ap.add_argument("--budgets", default="0.1,0.3")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--val-per-kind", type=int, default=25)
    ap.add_argument("--jobs", type=int, default=2, help="target fine-tunes in parallel")
    ap.add_argument("--tag", default="cpu")
    ap.add_argument("overrides", nargs="*", metavar="key=value", help="demo.yaml overrides")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")

    import torch
    from transformers import AutoTokenizer

    from s2l_ray.core.formats import content_id, to_example
    from s2l_ray.demo.data import KINDS
    from s2l_ray.models.tiny import resolve_model

    torch.set_num_threads(max(1, args.jobs))
    t_start = time.time()
    cfg = load_cfg(args.overrides)
    settings = study(cfg, set(args.study.split(",")))
    budgets = [float(b) for b in args.budgets.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    train, val = demo_rows(cfg, args.val_per_kind)
    tok = AutoTokenizer.from_pretrained(resolve_model(cfg.reference.model))
    enc = encode(tok, train, cfg)
    ids = [content_id(to_example(x, template=cfg.data.template).content) for x in train]
    sources = [x["source"] for x in train]
    log.info("lab: %d training rows, %d validation rows, %d settings x %d budgets x %d seeds",
             len(train), len(val), len(settings), len(budgets), len(seeds))

    traj: dict[RefSetting, np.ndarray] = {}
    ref_seconds = {}
    for s in settings:
        if s.ref is not None and s.ref not in traj:
            t0 = time.time()
            traj[s.ref] = trajectories(cfg, enc, s.ref, tok.pad_token_id)
            ref_seconds[s.ref] = time.time() - t0
            log.info("lab: reference %s: loss %.3f -> %.3f (%.0f s)", s.ref,
                     float(traj[s.ref][:, 0].mean()), float(traj[s.ref][:, -1].mean()),
                     ref_seconds[s.ref])

    jobs = []
    for s in [*settings, Setting("all data", "full")]:
        losses = traj[s.ref] if s.ref else None
        labels = (cluster_labels(s, ids, sources, losses, cfg)
                  if s.method == "s2l" and losses is not None else None)
        for budget in ([1.0] if s.method == "full" else budgets):
            for seed in seeds:
                rows = select_rows(s, budget, seed, ids, sources, losses, labels, cfg)
                kinds = Counter(train[i]["kind"] for i in rows)
                jobs.append({"setting": s.name, "budget": budget, "seed": seed,
                             "rows": rows.tolist(), "rows_n": len(rows), "kinds": dict(kinds),
                             "wrong_share": float(np.mean([train[i]["wrong"] for i in rows]))})
    # longest first, so the pool ends together
    jobs.sort(key=lambda j: -j["rows_n"])
    log.info("lab: %d target fine-tunes on %d processes", len(jobs), args.jobs)
    import multiprocessing

    trials = []
    with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn"),
                             initializer=_init_worker,
                             initargs=(args.overrides, args.val_per_kind)) as pool:
        for n, r in enumerate(pool.map(target_trial, jobs), 1):
            trials.append(r)
            if n % 10 == 0 or n == len(jobs):
                log.info("lab: %d/%d trials (%.0f s)", n, len(jobs), time.time() - t_start)

    kinds = [k for k in KINDS]
    tag = args.tag
    res = ROOT / "results"
    (res / f"selection_lab_{tag}.json").write_text(json.dumps(
        {"overrides": args.overrides, "trials": trials,
         "reference_seconds": {str(k): v for k, v in ref_seconds.items()}}, indent=1) + "\n")
    full = [t["macro_em"] for t in trials if t["setting"] == "all data"]
    text = [
        f"# Selection lab ({tag}): S2L's settings on the demo's validation split", "",
        f"Command: `python benchmarks/selection_lab.py {' '.join(sys.argv[1:])}`  ",
        f"Machine: CPU ({os.cpu_count()} cores), torch {torch.__version__}, {args.jobs} "
        f"fine-tunes at a time, 1 thread each; wall time {(time.time() - t_start) / 60:.1f} min; "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.", "",
        f"Data: demo.yaml's mathmix ({cfg.demo.n_train} rows, seed {cfg.demo.seed}), "
        f"{len(train)} training rows after deduplication (the demo's own), "
        f"{len(val)} validation rows ({args.val_per_kind} correct rows per kind drawn from the "
        "training stream, none among the training rows; the held-out split is not used). "
        "Reference "
        f"{cfg.reference.model} (lr {cfg.reference.lr}, batch {cfg.reference.batch_size}); target "
        f"{cfg.target.model} ({cfg.target.epochs} epochs over each subset, lr {cfg.target.lr}, "
        f"batch {cfg.target.batch_size}); greedy exact match per kind, macro = mean over kinds. "
        f"All data: macro EM {np.mean(full):.3f} (seeds {', '.join(f'{x:.3f}' for x in full)}).",
        "", "## Macro exact match on validation, per setting", "",
        "Mean ± std over seeds; `vs`: difference of means at the same budget.", "",
        summarize(trials, kinds), "## Rows per kind in each subset (first seed)", "",
        composition_table(trials, kinds)]
    (res / f"selection_lab_{tag}.md").write_text("\n".join(text))
    log.info("lab: wrote %s", res / f"selection_lab_{tag}.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
