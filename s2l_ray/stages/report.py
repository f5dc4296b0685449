"""`s2l report RUN_DIR`: the pictures of a run, as PNG files in RUN_DIR/report/.

    accuracy_vs_budget.png     macro exact match and macro held-out loss (the mean over sources
                               of each source's loss) vs budget, per method, with
                               every seed shown and the seed spread (min-max) shaded
    cluster_sizes.png          examples per cluster, and how many the selection took from each
    cluster_trajectories.png   mean loss trajectory of each cluster over the reference
                               checkpoints (the paper's picture)
    source_share.png           each source's share of the full data vs of each selection
    index.md                   the plots and the sweep's summary table
    index.html                 one self-contained page: the run at a glance, the sweep table,
                               the plots and a cluster browser (`report_html`)

Reads only published stage folders, plots what exists and says what it skipped. No Ray needed.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)
MAX_TRAJECTORY_ROWS = 500_000  # rows read for the per-cluster mean trajectories


def _json(path: Path) -> Any:
    return json.loads(path.read_text()) if path.is_file() else None


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    return plt


def plot_accuracy(results: list[dict[str, Any]], out: Path) -> Path:
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    methods = sorted({r["method"] for r in results} - {"full"})
    full = [r for r in results if r["method"] == "full"]
    loss = "macro_loss" if any("macro_loss" in r for r in results) else "eval_loss"
    for ax, metric, label in ((axes[0], "macro_em", "macro exact match (held-out)"),
                              (axes[1], loss, f"held-out {loss.replace('_', ' ')} (lower is "
                               "better)")):
        for m in methods:
            rs = [r for r in results if r["method"] == m and r.get(metric) is not None]
            xs = sorted({r["fraction"] for r in rs})
            vals = [[r[metric] for r in rs if r["fraction"] == x] for x in xs]
            mean = [float(np.mean(v)) for v in vals]
            line, = ax.plot([100 * x for x in xs], mean, marker="o", label=m)
            ax.fill_between([100 * x for x in xs], [min(v) for v in vals],
                            [max(v) for v in vals], color=line.get_color(), alpha=0.15)
            for x, v in zip(xs, vals):
                ax.scatter([100 * x] * len(v), v, s=10, color=line.get_color(), alpha=0.6)
        fv = [r[metric] for r in full if r.get(metric) is not None]
        if fv:
            ax.axhline(float(np.mean(fv)), color="black", ls="--", lw=1,
                       label=f"full data ({len(fv)} seed{'s' * (len(fv) > 1)})")
        ax.set_xlabel("budget (% of the training data)")
        ax.set_ylabel(label)
        if metric == "macro_em":  # an honest axis: one held-out answer is not a trend
            ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("Target model after fine-tuning on each selection (points: seeds; band: "
                 "min-max)", fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def plot_cluster_sizes(select_report: dict[str, Any], out: Path) -> Path:
    plt = _plt()
    before = np.asarray(select_report["clusters"]["before"])
    after = np.asarray(select_report["clusters"]["after"])
    order = np.argsort(-before, kind="stable")
    fig, ax = plt.subplots(figsize=(max(6, 0.25 * len(before) + 2), 4))
    x = np.arange(len(before))
    ax.bar(x, before[order], color="#bbbbbb", label="examples in cluster")
    ax.bar(x, after[order], color="#d62728", label=f"selected ({select_report['method']}, "
           f"{select_report['selected']} of {select_report['examples']})")
    ax.set_xticks(x, [str(c) for c in order], fontsize=7, rotation=90)
    ax.set_xlabel("cluster (largest first)")
    ax.set_ylabel("examples")
    ax.set_yscale("log")
    ax.legend(fontsize=8)
    ax.set_title("Cluster sizes and the selection per cluster")
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def cluster_mean_trajectories(run: Path) -> tuple[np.ndarray, np.ndarray]:
    """(K, T) mean raw loss trajectory per cluster and (K,) rows used, from the published
    trajectories and assignments (up to MAX_TRAJECTORY_ROWS rows, whole files)."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from s2l_ray.io.parquet import losses_matrix, parquet_files

    k = int(np.load(run / "cluster" / "centroids.npy", mmap_mode="r").shape[0])
    labels = pa.concat_tables(pq.read_table(f, columns=["id", "cluster"]) for f in
                              parquet_files(run / "cluster" / "assignments", "cluster")
                              ).combine_chunks()
    sums, counts, read = None, np.zeros(k, np.int64), 0
    for f in parquet_files(run / "trajectories", "trajectories"):
        t = pq.read_table(f, columns=["id", "losses"])
        where = pc.index_in(t["id"], value_set=labels["id"])  # row of each id in the labels
        keep = pc.is_valid(where)
        x = losses_matrix(t["losses"].filter(keep).combine_chunks(), f).astype(
            np.float64)  # (n, T)
        c = labels["cluster"].take(where.filter(keep)).to_numpy()
        if sums is None:
            sums = np.zeros((k, x.shape[1]))
        np.add.at(sums, c, x)
        counts += np.bincount(c, minlength=k)
        read += len(c)
        if read >= MAX_TRAJECTORY_ROWS:
            break
    if sums is None:
        raise FileNotFoundError(f"no trajectories under {run / 'trajectories'}")
    return sums / np.maximum(counts, 1)[:, None], counts


def plot_trajectories(means: np.ndarray, counts: np.ndarray, steps: list[int],
                      out: Path) -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    cmap = plt.get_cmap("viridis")
    order = np.argsort(means[:, -1])
    for rank, c in enumerate(order):
        if counts[c] == 0:
            continue
        ax.plot(steps, means[c], color=cmap(rank / max(1, len(order) - 1)),
                lw=0.6 + 2.4 * counts[c] / counts.max(), alpha=0.85)
    overall = (means * counts[:, None]).sum(0) / max(1, counts.sum())
    ax.plot(steps, overall, color="black", ls="--", lw=2, label="all examples")
    ax.set_xlabel("reference checkpoint (optimizer step)")
    ax.set_ylabel("mean loss of the cluster's examples")
    ax.set_title(f"Loss trajectory per cluster ({len(order)} clusters; width ~ size)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def plot_source_share(full: dict[str, int], selections: dict[str, dict[str, int]],
                      out: Path) -> Path:
    plt = _plt()
    names = sorted(full, key=lambda s: -full[s])
    series = {"full data": full, **selections}
    fig, ax = plt.subplots(figsize=(max(7, 1.1 * len(names) + 2), 4.2))
    width = 0.8 / len(series)
    for i, (label, counts) in enumerate(series.items()):
        total = max(1, sum(counts.values()))
        ax.bar(np.arange(len(names)) + i * width, [counts.get(s, 0) / total for s in names],
               width, label=label, color="#555555" if i == 0 else None)
    ax.set_xticks(np.arange(len(names)) + 0.4 - width / 2, names, rotation=30, ha="right")
    ax.set_ylabel("share of examples")
    ax.set_title("Per-source share: full data vs each selection")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def _selections(run: Path) -> dict[str, dict[str, Any]]:
    """Selection reports to compare: each sweep method at its smallest budget (first seed), or
    the select stage's when there is no sweep."""
    found: dict[str, dict[str, Any]] = {}
    for f in sorted((run / "sweep" / "trials").glob("*/selection/report.json")):
        r = _json(f)
        key = r["method"]
        if key not in found or (r["selected"], r["seed"]) < (found[key]["selected"],
                                                             found[key]["seed"]):
            found[key] = r
    if not found and (r := _json(run / "select" / "report.json")):
        found[r["method"]] = r
    return found


def make_report(run_dir: str | Path, examples_per_cluster: int = 3) -> list[Path]:
    """Write every plot the run's published stages allow, and index.md and index.html (with
    `examples_per_cluster` examples per cluster); returns the PNG files written."""
    run = Path(run_dir).expanduser().resolve()
    if not run.is_dir():
        from s2l_ray.config import ConfigError

        raise ConfigError(f"'{run}' is not a run folder. Fix: pass the run.output_dir of a run")
    out = run / "report"
    out.mkdir(exist_ok=True)
    written: list[Path] = []
    results = run / "sweep" / "results.parquet"
    if (run / "sweep" / "_SUCCESS.json").is_file():
        import pyarrow.parquet as pq

        written.append(plot_accuracy(pq.read_table(results).to_pylist(),
                                     out / "accuracy_vs_budget.png"))
    else:
        log.info("report: no finished sweep in %s; skipping accuracy_vs_budget", run)
    sel = _selections(run)
    main = sel.get("s2l") or next(iter(sel.values()), None)
    if main and (run / "cluster" / "_SUCCESS.json").is_file():
        written.append(plot_cluster_sizes(main, out / "cluster_sizes.png"))
        manifest = _json(run / "train_ref" / "manifest.json")
        means, counts = cluster_mean_trajectories(run)
        steps = [m["step"] for m in manifest] if manifest else list(range(1, means.shape[1] + 1))
        written.append(plot_trajectories(means, counts, steps, out / "cluster_trajectories.png"))
    else:
        log.info("report: no clusters or selection in %s; skipping the cluster plots", run)
    if sel:
        labels = {f"{m} ({r['selected']}, seed {r['seed']})": r["sources"]["after"]
                  for m, r in sorted(sel.items())}
        written.append(plot_source_share(main["sources"]["before"], labels,
                                         out / "source_share.png"))
    lines = [f"# s2l report: {run}", "", "The whole run on one page: [index.html](index.html)",
             ""] + [f"![{p.stem}]({p.name})" for p in written]
    summary = run / "sweep" / "summary.md"
    if summary.is_file():
        lines += ["", summary.read_text()]
    (out / "index.md").write_text("\n".join(lines) + "\n")
    for p in written:
        log.info("report: wrote %s", p)
    from s2l_ray.stages.report_html import write_html_report

    page = write_html_report(run, written, examples_per_cluster)
    log.info("report: the whole run on one page: %s", page.as_uri())
    return written
