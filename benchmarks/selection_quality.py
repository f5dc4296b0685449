"""Selection quality: does S2L beat random AND the source-balanced control at equal budget?

Runs the whole pipeline on the built-in demo data (reference model >= 10x smaller than the
target), then sweeps budgets x methods x seeds; every trial is a real fine-tune of the target
and a greedy exact-match evaluation on the held-out split. Three variants of the clustering:

    global      one k-means over all rows (the default): S2L with and without the noise cap
                (s2l_nocap, s2l_cap), random, source_balanced, stratified and the four
                loss-score baselines, plus the full data
    per_source  the official code's rules (config.OFFICIAL_S2L: k-means within each source,
                budget split over sources, clusters <= 2 held back, faiss's defaults; k from the
                scale): S2L with and without the cap. Reuses the global run's ingest, reference
                and trajectories (hard links), so only clustering and the trials are redone
    no_source   the source column removed (data.source_column points at nothing), so only the
                trajectories can find the rare kinds: S2L with and without the cap, and random.
                Its exact match is over all held-out rows (there are no sources to average)

Per trial it also records what the subset holds by the data generator's marks (each row's
kind and whether its answer is wrong, read from the rows' JSON with --kind-key/--wrong-key):
the wrong-answer share and per-kind exact match. Writes benchmarks/results/
selection_quality_<tag>.md and the plots under benchmarks/results/selection_quality_<tag>/.

    python benchmarks/selection_quality.py --scale cpu                # the full measurement
    python benchmarks/selection_quality.py --scale cpu --small        # a quick look (see SMALL)
    python benchmarks/selection_quality.py --scale cpu_random_init    # random-init tiny models
    python benchmarks/selection_quality.py --scale gpu                # one GPU: larger models
    python benchmarks/selection_quality.py --scale cpu sweep.seeds=[0,1,2,3,4]   # any override

A rerun with the same settings resumes (finished stages and trials are kept).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent
log = logging.getLogger("s2l_ray.bench")

BUDGETS = "[0.05,0.1,0.2,0.3,1.0]"
PARTIAL_BUDGETS = "[0.05,0.1,0.2,0.3]"  # variants share the full-data trials of `global`
SEEDS = "[0,1,2]"
METHODS = {
    "global": "[s2l_nocap,s2l_cap,random,source_balanced,stratified,least_confidence,"
              "middle_perplexity,high_learnability,el2n]",
    "per_source": "[s2l_nocap,s2l_cap]",
    "no_source": "[s2l_nocap,s2l_cap,random]",
}
# --small: a quick look that fits a shared 2-core machine (about 12 trials)
SMALL = {"budgets": "[0.1,0.3,1.0]", "partial": "[0.1,0.3]", "seeds": "[0]",
         "global": "[s2l_nocap,s2l_cap,random,source_balanced]",
         "per_source": "[s2l_nocap]", "no_source": "[s2l_nocap,random]"}
SCALES = {
    # the demo's own setting (s2l_ray/configs/demo.yaml): tiny-pre:micro -> tiny-pre:small,
    # both pre-trained once on number facts, as the paper's targets are pretrained LLMs; a
    # larger held-out split than the demo's, so one answer moves exact match less
    "cpu": ["demo.n_test_per_source=50"],
    # the same with random-init tiny models, which must learn everything from the subset
    "cpu_random_init": ["reference.model=tiny:micro", "target.model=tiny:small",
                        "demo.n_test_per_source=50"],
    # the same shape at 10x the data, on one GPU
    "gpu": ["reference.model=tiny:small", "target.model=tiny:base",
            "demo.n_train=20000", "demo.n_test_per_source=200", "reference.num_workers=1",
            "reference.cpus_per_worker=4", "reference.batch_size=64", "target.num_workers=1",
            "target.cpus_per_worker=4", "target.batch_size=64", "target.epochs=3",
            "target.lr=1e-3", "trajectories.cpus_per_actor=4", "eval.cpus=4",
            "eval.batch_size=256"],
}
SHARED_STAGES = ("ingest", "train_ref", "trajectories")  # what per_source reuses from global
NO_SOURCE_COLUMN = "__no_source_column__"


def variant_overrides(variant: str, small: bool) -> list[str]:
    from s2l_ray.config import OFFICIAL_S2L

    budgets = (SMALL["budgets"] if small else BUDGETS) if variant == "global" else (
        SMALL["partial"] if small else PARTIAL_BUDGETS)
    out = [f"sweep.methods={SMALL[variant] if small else METHODS[variant]}",
           f"sweep.budgets={budgets}", f"sweep.seeds={SMALL['seeds'] if small else SEEDS}"]
    if variant == "per_source":  # the official rules; k stays the scale's (see the docstring)
        out += [o for o in OFFICIAL_S2L if not o.startswith("cluster.k=")]
    if variant == "no_source":
        out.append(f"data.source_column={NO_SOURCE_COLUMN}")
    return out


def link_stages(src_run: Path, dst_run: Path) -> None:
    """Hard-link the shared stage folders of the global run into another run's folder."""
    for stage in SHARED_STAGES:
        src, dst = src_run / stage, dst_run / stage
        if src.is_dir() and not dst.exists():
            dst_run.mkdir(parents=True, exist_ok=True)
            shutil.copytree(src, dst, copy_function=os.link)


def trial_marks(run: Path, rows: list[dict[str, Any]], kind_key: str, wrong_key: str) -> None:
    """Add to every trial row its subset's wrong-answer share, its kind counts and its exact
    match per kind, from the generator's marks (see stages.results' marks contract)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from s2l_ray.io.parquet import parquet_files
    from s2l_ray.stages.results import FULL, marks_from_raw, per_kind_accuracy, subset_composition

    ex = pa.concat_tables(pq.read_table(f, columns=["id", "raw"])
                          for f in parquet_files(run / "ingest" / "examples", "ingest"))
    train_marks = marks_from_raw(ex["id"].to_pylist(), ex["raw"].to_pylist(), kind_key,
                                 wrong_key)
    held = pq.read_table(run / "sweep" / "eval" / "examples.parquet")
    eval_marks = (marks_from_raw(held["id"].to_pylist(), held["raw"].to_pylist(), kind_key,
                                 wrong_key) if "raw" in held.column_names else {})
    for r in rows:
        d = run / "sweep" / "trials" / r["trial"]
        ids = (list(train_marks) if r["method"] == FULL else
               pq.read_table(d / "selection" / "selected.parquet", columns=["id"])[
                   "id"].to_pylist())
        comp = subset_composition(ids, train_marks)
        r["wrong_share"] = comp["wrong_share"]
        r.update({f"kind_n/{k}": v for k, v in comp["kinds"].items()})
        preds = pq.read_table(d / "predictions.parquet", columns=["id", "correct"])
        r.update({f"kind_em/{k}": v for k, v in per_kind_accuracy(
            preds["id"].to_pylist(), preds["correct"].to_pylist(), eval_marks).items()})


def goal_table(rows: list[dict[str, Any]], s2l_methods: list[str]) -> str:
    """Per budget: each S2L variant's macro EM against random and source_balanced (mean over
    seeds, and the largest seed std of the three as the spread), and against the full data."""
    import numpy as np

    def stat(method: str, size: int) -> tuple[float, float] | None:
        v = [r["macro_em"] for r in rows if r["method"] == method and r["size"] == size]
        return (float(np.mean(v)), float(np.std(v, ddof=1)) if len(v) > 1 else 0.0) if v else None

    def fmt(x: float | None, spec: str = ".3f") -> str:  # a missing control reads n/a
        return "n/a" if x is None or x != x else format(x, spec)

    full = [r["macro_em"] for r in rows if r["method"] == "full"]
    full_m = float(np.mean(full)) if full else float("nan")
    lines = ["| budget | S2L variant | S2L | random | source_balanced | spread | beats both by "
             "more than the spread | S2L / full |", "|" + " --- |" * 8]
    for size in sorted({r["size"] for r in rows if r["method"] != "full"}):
        budget = next(r["budget"] for r in rows if r["size"] == size)
        rnd, sb = stat("random", size), stat("source_balanced", size)
        for m in s2l_methods:
            s = stat(m, size)
            if s is None:
                continue
            others = [o for o in (rnd, sb) if o is not None]
            spread = max([s[1]] + [o[1] for o in others])
            ok = all(s[0] - o[0] > spread for o in others) if others else None
            lines.append(
                f"| {budget} | {m} | {s[0]:.3f} | {fmt(rnd[0] if rnd else None)} | "
                f"{fmt(sb[0] if sb else None)} | {spread:.3f} | "
                f"{'yes' if ok else 'no' if ok is not None else 'n/a'} | "
                f"{fmt(s[0] / full_m if full_m else None, '.2f')} |")
    return "\n".join(lines) + "\n"


def wins(rows: list[dict], method: str, versus: str, metric: str = "macro_em") -> str:
    """Seed-by-seed: how often `method` beats `versus` at the same budget and seed."""
    sign = -1.0 if metric.endswith("loss") else 1.0
    by = {(r["method"], r["budget"], r["seed"]): sign * r[metric] for r in rows}
    pairs = [(v, by[(versus, b, s)]) for (m, b, s), v in by.items()
             if m == method and (versus, b, s) in by]
    return (f"{sum(a > b for a, b in pairs)} wins, {sum(a == b for a, b in pairs)} ties, "
            f"{sum(a < b for a, b in pairs)} losses in {len(pairs)} (budget, seed) pairs")


def run_variant(variant: str, args: argparse.Namespace, base_out: Path) -> dict[str, Any]:
    import pyarrow.parquet as pq

    from s2l_ray.cli import PACKAGED
    from s2l_ray.config import load_config
    from s2l_ray.stages.registry import run_pipeline
    from s2l_ray.stages.report import make_report

    out = base_out / variant
    if variant == "per_source":
        link_stages(base_out / "global", out)
    cfg = load_config(PACKAGED / "demo.yaml",
                      [f"run.output_dir={out}", *SCALES[args.scale],
                       *variant_overrides(variant, args.small), *args.overrides])
    wall_file = out / "bench_wall.json"  # the measured wall time, kept for --table-only
    if args.table_only:
        if not (out / "sweep" / "results.parquet").exists():
            raise SystemExit(f"--table-only: {out} has no finished sweep; run without it first")
        wall = json.loads(wall_file.read_text())["seconds"] if wall_file.exists() else float("nan")
    else:
        t0 = time.time()
        run_pipeline(cfg)
        make_report(cfg.run.output_dir)
        wall = time.time() - t0
        wall_file.write_text(json.dumps({"seconds": wall}))
    rows = pq.read_table(out / "sweep" / "results.parquet").to_pylist()
    trial_marks(out, rows, args.kind_key, args.wrong_key)
    for r in rows:
        r["variant"] = variant
    return {"cfg": cfg, "rows": rows, "wall": wall, "out": out}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scale", choices=sorted(SCALES), default="cpu")
    ap.add_argument("--small", action="store_true", help="a quick look: few budgets, methods "
                    "and one seed (see SMALL); results go to selection_quality_<scale>_small")
    ap.add_argument("--variants", default="global,per_source,no_source",
                    help="comma-separated subset of global,per_source,no_source")
    ap.add_argument("--kind-key", default="kind",
                    help="dotted JSON key of each row's kind of problem (the generator's mark)")
    ap.add_argument("--wrong-key", default="wrong",
                    help="dotted JSON key marking a row whose answer is wrong")
    ap.add_argument("--out", default=None, help="run folder (default /tmp/s2l_quality_<tag>)")
    ap.add_argument("--table-only", action="store_true",
                    help="rebuild the results file from the finished run folders (no Ray, no "
                    "training; wall times as measured by the run)")
    ap.add_argument("overrides", nargs="*", metavar="key=value")
    args = ap.parse_args()
    variants = [v for v in args.variants.split(",") if v]
    if "per_source" in variants and "global" not in variants:
        ap.error("per_source reuses the global run's stages: include global")

    from s2l_ray.config import dump_config
    from s2l_ray.runtime import setup_logging
    from s2l_ray.stages.results import markdown_summary, mean_table, summarize

    setup_logging("INFO")
    tag = args.scale + ("_small" if args.small else "")
    base_out = Path(args.out or f"/tmp/s2l_quality_{tag}")
    runs = {v: run_variant(v, args, base_out) for v in variants}
    import torch

    g = runs[variants[0]]
    cfg = g["cfg"]
    manifest = json.loads((g["out"] / "train_ref" / "manifest.json").read_text())
    eval_rep = json.loads((g["out"] / "sweep" / "report.json").read_text())["eval"]
    argv = " ".join(["--scale", args.scale] + (["--small"] if args.small else []) +
                    (["--variants", args.variants] if args.variants != ap.get_default(
                        "variants") else []) + args.overrides)
    plots = ROOT / "results" / f"selection_quality_{tag}"
    device = f"GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else "CPU"
    text = [f"# Selection quality ({tag})", "",
            f"Command: `python benchmarks/selection_quality.py {argv}`",
            f"Machine: {device} ({os.cpu_count()} cores), wall time "
            + ", ".join(f"{v} {r['wall'] / 60:.1f} min" for v, r in runs.items())
            + " (a resumed run counts only what it redid).", "",
            f"Reference {cfg.reference.model} ({len(manifest)} checkpoints, train loss "
            f"{manifest[0]['train_loss']:.3f} -> {manifest[-1]['train_loss']:.3f}); target "
            f"{cfg.target.model}, {cfg.target.epochs} epochs over each subset, lr "
            f"{cfg.target.lr}; {cfg.cluster.k} clusters (per source in per_source). Held out: "
            f"{eval_rep['examples']} examples, greedy, {cfg.eval.max_new_tokens} new tokens at "
            "most.", ""]
    for v, r in runs.items():
        rows = r["rows"]
        s2l = sorted({x["method"] for x in rows if x["method"].startswith("s2l")})
        # per_source and no_source run no control of their own that global has: compare them
        # with the global run's (same rows, held-out split, target and seeds). no_source takes
        # only global's full-data trials (training on all rows never reads the source column);
        # source_balanced needs the column it removes
        borrow = {"per_source": ("random", "source_balanced", "full"),
                  "no_source": ("full",)}.get(v, ()) if "global" in runs else ()
        have = {x["method"] for x in rows}
        cmp_rows = rows + [x for x in runs.get("global", {"rows": []})["rows"]
                           if x["method"] in borrow and x["method"] not in have]
        text += [f"## Variant `{v}`", "",
                 markdown_summary(summarize(rows), title=f"{v}: macro exact match and macro "
                                  "held-out loss"), ""]
        if borrow:
            taken = ", ".join(b for b in borrow if b not in have)
            text += [f"Compared with the `global` run's trials of: {taken}.", ""]
        text += ["### Goal: S2L >= random and >= source_balanced by more than the seed "
                 "spread, and >= 95% of the full data, at every budget <= 30%", "",
                 goal_table(cmp_rows, s2l), ""]
        text += ["S2L vs random, seed by seed (macro_em): " + "; ".join(
                     f"{m}: {wins(cmp_rows, m, 'random')}" for m in s2l), ""]
        if any(x["method"] == "source_balanced" for x in cmp_rows):
            text += ["S2L vs source_balanced, seed by seed (macro_em): " + "; ".join(
                f"{m}: {wins(cmp_rows, m, 'source_balanced')}" for m in s2l), ""]
        text += [mean_table(rows, "em/", f"### {v}: exact match per source (mean over seeds)"),
                 mean_table(rows, "kind_em/", f"### {v}: exact match per kind of problem "
                            "(generator's marks; mean over seeds)"),
                 mean_table(rows, "wrong_share", f"### {v}: wrong-answer share of each "
                            "subset (generator's marks; mean over seeds)", "{:.3f}"),
                 mean_table(rows, "kind_n/", f"### {v}: rows per kind in each subset (mean "
                            "over seeds)", "{:.0f}")]
        dest = plots / v
        dest.mkdir(parents=True, exist_ok=True)
        for png in (r["out"] / "report").glob("*.png"):
            shutil.copy(png, dest / png.name)
        text += [f"Plots: `{dest.relative_to(ROOT.parent)}/`.", ""]
    text += ["## Resolved config (first variant)", "", "```yaml", dump_config(cfg).rstrip(),
             "```", ""]
    import pyarrow as pa

    all_rows = [x for r in runs.values() for x in r["rows"]]
    keys = sorted({k for x in all_rows for k in x})
    plots.mkdir(parents=True, exist_ok=True)
    pa.Table.from_pylist([{k: x.get(k) for k in keys} for x in all_rows]).to_pandas().to_csv(
        plots / "results.csv", index=False)
    out_md = ROOT / "results" / f"selection_quality_{tag}.md"
    out_md.write_text("\n".join(text))
    log.info("wrote %s", out_md)


if __name__ == "__main__":
    main()
