"""Selection quality: does S2L beat random (and the loss-based baselines) at equal budget?

Runs the whole pipeline on the built-in mathmix data (reference model >= 10x smaller than the
target), then a sweep over budgets 10/20/30% and the full data, S2L, random and the four
loss-based baselines, several seeds; every trial is a real fine-tune of the target and a greedy
exact-match evaluation on the held-out split. Writes benchmarks/results/selection_quality_<scale>.md
with macro accuracy mean ± spread per method and budget, S2L's gap to random at each budget
(the baseline measured in the same run), the full-data ceiling, and per-source accuracy.

    python benchmarks/selection_quality.py --scale cpu                # 2-core laptop scale
    python benchmarks/selection_quality.py --scale gpu                # one GPU: larger models
    python benchmarks/selection_quality.py --scale cpu sweep.seeds=[0,1,2,3,4]   # any override

A rerun with the same settings resumes (finished stages and trials are kept).
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
METHODS = "[s2l,random,least_confidence,middle_perplexity,high_learnability,el2n]"
COMMON = [f"sweep.methods={METHODS}", "sweep.budgets=[0.1,0.2,0.3,1.0]", "sweep.seeds=[0,1,2]"]
SCALES = {
    # tiny:nano (57k parameters) -> tiny:small (0.92M, 16x): what 57 fine-tunes on 2 CPU cores
    # afford in about an hour; 2,000 training rows, 280 held out
    "cpu": [*COMMON, "reference.model=tiny:nano", "target.model=tiny:small",
            "reference.lr=3e-3", "reference.epochs=3", "demo.n_train=2000",
            "demo.n_test_per_source=40", "target.epochs=3", "target.lr=1e-3",
            "eval.max_new_tokens=104"],
    # the same shape at 10x the data, on one GPU
    "gpu": [*COMMON, "reference.model=tiny:small", "target.model=tiny:base",
            "demo.n_train=20000", "demo.n_test_per_source=200", "reference.num_workers=1",
            "reference.cpus_per_worker=4", "reference.batch_size=64", "target.num_workers=1",
            "target.cpus_per_worker=4", "target.batch_size=64", "target.epochs=3",
            "target.lr=1e-3", "trajectories.cpus_per_actor=4", "eval.cpus=4",
            "eval.batch_size=256"],
}


def per_source_table(rows: list[dict], budgets: list[str]) -> str:
    sources = sorted({k[3:] for r in rows for k in r if k.startswith("em/")})
    lines = ["| budget | method | " + " | ".join(sources) + " |",
             "| --- | --- | " + " | ".join("---" for _ in sources) + " |"]
    for b in budgets:
        for m in sorted({r["method"] for r in rows if r["budget"] == b}):
            rs = [r for r in rows if r["budget"] == b and r["method"] == m]
            cells = [f"{sum(r.get('em/' + s, 0.0) for r in rs) / len(rs):.2f}" for s in sources]
            lines.append(f"| {b} | {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def wins(rows: list[dict], method: str, versus: str, metric: str = "macro_em") -> str:
    """Seed-by-seed: how often `method` beats `versus` at the same budget and seed (a lower
    value wins for a loss)."""
    sign = -1.0 if metric.endswith("loss") else 1.0
    by = {(r["method"], r["budget"], r["seed"]): sign * r[metric] for r in rows}
    pairs = [(v, by[(versus, b, s)]) for (m, b, s), v in by.items()
             if m == method and (versus, b, s) in by]
    return (f"{sum(a > b for a, b in pairs)} wins, {sum(a == b for a, b in pairs)} ties, "
            f"{sum(a < b for a, b in pairs)} losses in {len(pairs)} (budget, seed) pairs")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scale", choices=sorted(SCALES), default="cpu")
    ap.add_argument("--out", default=None, help="run folder (default /tmp/s2l_quality_<scale>)")
    ap.add_argument("overrides", nargs="*", metavar="key=value")
    args = ap.parse_args()

    import pyarrow.parquet as pq

    from s2l_ray.cli import PACKAGED
    from s2l_ray.config import dump_config, load_config
    from s2l_ray.runtime import setup_logging
    from s2l_ray.stages.registry import run_pipeline
    from s2l_ray.stages.report import make_report
    from s2l_ray.stages.results import markdown_summary, summarize

    setup_logging("INFO")
    out = args.out or f"/tmp/s2l_quality_{args.scale}"
    cfg = load_config(PACKAGED / "demo.yaml",
                      [f"run.output_dir={out}", *SCALES[args.scale], *args.overrides])
    t0 = time.time()
    run_pipeline(cfg)
    make_report(cfg.run.output_dir)
    wall = time.time() - t0
    run = Path(cfg.run.output_dir)
    rows = pq.read_table(run / "sweep" / "results.parquet").to_pylist()
    budgets = [b for b in dict.fromkeys(r["budget"] for r in rows)]
    manifest = json.loads((run / "train_ref" / "manifest.json").read_text())
    eval_rep = json.loads((run / "sweep" / "report.json").read_text())["eval"]
    import torch

    text = "\n".join([
        f"# Selection quality ({args.scale})", "",
        f"Command: `python benchmarks/selection_quality.py --scale {args.scale} "
        f"{' '.join(args.overrides)}".rstrip() + "`",
        f"Machine: {'GPU ' + torch.cuda.get_device_name() if torch.cuda.is_available() else 'CPU'}"
        f", {len(rows)} trials, wall time {wall / 60:.1f} min (including the pipeline; a "
        "resumed run counts only what it redid).", "",
        f"Reference {cfg.reference.model} ({len(manifest)} checkpoints, train loss "
        f"{manifest[0]['train_loss']:.3f} -> {manifest[-1]['train_loss']:.3f}); target "
        f"{cfg.target.model}, {cfg.target.epochs} epochs over each subset, lr {cfg.target.lr}; "
        f"{cfg.cluster.k} clusters. Held out: {eval_rep['examples']} examples "
        f"({eval_rep['with_answer']} with a final answer), greedy, "
        f"{cfg.eval.max_new_tokens} new tokens at most.", "",
        markdown_summary(summarize(rows), title="Macro exact match and macro held-out loss"),
        f"S2L vs random, seed by seed: macro_em {wins(rows, 's2l', 'random')}; macro_loss "
        f"{wins(rows, 's2l', 'random', 'macro_loss')}.", "",
        "## Per-source exact match (mean over seeds)", "", per_source_table(rows, budgets), "",
        "## Resolved config", "", "```yaml", dump_config(cfg).rstrip(), "```", ""])
    dest = ROOT / "results" / f"selection_quality_{args.scale}.md"
    dest.write_text(text)
    logging.getLogger("s2l_ray").info("wrote %s\n%s", dest, text)


if __name__ == "__main__":
    main()
