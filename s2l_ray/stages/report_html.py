"""`s2l report RUN_DIR` -> RUN_DIR/report/index.html: the run on one self-contained page.

    the run at a glance   every stage: done or not, time, its counts and rates (report.json),
                          ingest's rejects by reason, the resolved config
    sweep                 methods x budgets per metric, mean ± std over seeds [min, max]
    plots                 the PNG files of `report.py`, inline as base64
    cluster browser       every cluster: size, what each selection took from it, its source
                          make-up, its mean loss trajectory (inline SVG), the examples nearest
                          its centroid (instruction and response, truncated); sortable by size
                          or mean loss (a few lines of inline JS; `#sort=loss-desc` in the URL
                          sorts on load)

The page loads nothing: images are data: URIs, and a Content-Security-Policy allows no network,
no plugins and only the page's own script (by its hash). Every piece of user data is HTML-escaped
(`html.escape`), so an instruction holding `<script>` shows as text; the CSP is the second wall.
Reads only published stage folders; no Ray.
"""

from __future__ import annotations

import base64
import hashlib
import html
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)
STAGES = ("ingest", "train_ref", "trajectories", "cluster", "select", "sweep")
EXAMPLES_PER_CLUSTER = 3  # the ones nearest the centroid: the cluster's most typical rows
TEXT_CHARS = 280  # instruction / response shown per example, truncated
MAX_SELECTIONS = 8  # selection columns in the cluster browser
PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2",
           "#7f7f7f", "#bcbd22", "#17becf")


def esc(value: Any) -> str:
    """Any value as HTML text (quotes included, so it is safe inside attributes too)."""
    return html.escape(str(value), quote=True)


def _json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def _fmt(v: Any) -> str:
    if isinstance(v, bool) or v is None:
        return str(v)
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1e5 else f"{v:,.0f}"
    return str(v)


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    if seconds < 120:
        return f"{seconds:.1f} s"
    m, s = divmod(round(seconds), 60)
    return f"{m // 60} h {m % 60} min" if m >= 60 else f"{m} min {s} s"


# ---------------------------------------------------------------------------------------------
# what the page shows, gathered from the published stages


@dataclass
class ClusterRow:
    cluster: int
    size: int
    taken: list[int]  # per selection column
    sources: dict[str, int]
    trajectory: list[float]  # (T,) mean loss of its examples per checkpoint
    examples: list[dict[str, str]] = field(default_factory=list)

    @property
    def mean_loss(self) -> float:
        return float(np.mean(self.trajectory)) if self.trajectory else float("nan")


def stage_overview(run: Path) -> list[dict[str, Any]]:
    """One entry per pipeline stage: published or not, seconds, and its report's scalars."""
    rows = []
    for name in STAGES:
        marker = _json(run / name / "_SUCCESS.json")
        rep = _json(run / name / "report.json") if marker else None
        scalars = {k: v for k, v in (rep or {}).items()
                   if isinstance(v, (int, float, str, bool)) and k not in ("stage", "seconds")
                   and len(str(v)) <= 120}
        rows.append({"stage": name, "done": marker is not None,
                     "seconds": (marker or {}).get("seconds"),
                     "finished_at": (marker or {}).get("finished_at"),
                     "numbers": scalars, "report": rep or {}})
    return rows


def selection_columns(run: Path) -> list[tuple[str, list[int]]]:
    """(label, examples taken from each cluster) per selection: the select stage's, then each
    sweep (method, size) at its first seed, at most MAX_SELECTIONS."""
    cols: list[tuple[str, list[int]]] = []
    rep = _json(run / "select" / "report.json")
    if rep and "clusters" in rep:
        cols.append((f"select: {rep['method']} {rep['selected']}", rep["clusters"]["after"]))
    seen: dict[tuple[str, int], tuple[int, list[int]]] = {}
    for f in sorted((run / "sweep" / "trials").glob("*/selection/report.json")):
        r = _json(f)
        if not r or "clusters" not in r:
            continue
        key = (r["method"], int(r["selected"]))
        if key not in seen or r["seed"] < seen[key][0]:
            seen[key] = (r["seed"], r["clusters"]["after"])
    for (method, size), (seed, after) in sorted(seen.items(), key=lambda kv: (kv[0][1],
                                                                                kv[0][0])):
        cols.append((f"sweep: {method} {size} (seed {seed})", after))
    return cols[:MAX_SELECTIONS]


def _example_text(raw: str | None, prompt: str, response: str) -> tuple[str, str]:
    """(instruction, response) as the user wrote them: from the original row when it parses,
    else the templated prompt."""
    try:
        row = json.loads(raw) if raw else None
    except ValueError:
        row = None
    if isinstance(row, dict):
        if isinstance(row.get("instruction"), str):
            inst = row["instruction"]
            if isinstance(row.get("input"), str) and row["input"].strip():
                inst += "\n\n" + row["input"]
            return inst, response
        if isinstance(row.get("messages"), list):
            user = [m.get("content", "") for m in row["messages"]
                    if isinstance(m, dict) and m.get("role") == "user"]
            if user and isinstance(user[0], str):
                return user[0], response
    return prompt, response


def _clip(text: str, n: int = TEXT_CHARS) -> str:
    return text if len(text) <= n else text[:n].rstrip() + " …"


def cluster_rows(run: Path,
                 examples_per_cluster: int = EXAMPLES_PER_CLUSTER) -> list[ClusterRow]:
    """Every cluster of a finished cluster stage, with its selections, sources, mean trajectory
    and the examples nearest its centroid."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.dataset as pads
    import pyarrow.parquet as pq

    from s2l_ray.io.parquet import parquet_files
    from s2l_ray.stages.report import cluster_mean_trajectories

    k = int(np.load(run / "cluster" / "centroids.npy", mmap_mode="r").shape[0])
    files = parquet_files(run / "cluster" / "assignments", "cluster")
    want = ["id", "cluster", "source", "distance"]
    parts = []
    for f in files:
        have = [c for c in want if c in pq.ParquetFile(f).schema_arrow.names]
        parts.append(pq.read_table(f, columns=have))
    labels = pa.concat_tables(parts, promote_options="default").combine_chunks()
    cl = labels["cluster"].to_numpy()
    sizes = np.bincount(cl, minlength=k)
    sources: list[dict[str, int]] = [{} for _ in range(k)]
    if "source" in labels.column_names:
        g = labels.group_by(["cluster", "source"]).aggregate([([], "count_all")])
        for c, s, n in zip(g["cluster"].to_pylist(), g["source"].to_pylist(),
                           g["count_all"].to_pylist()):
            sources[c][s if s is not None else "(none)"] = n
    means, _ = cluster_mean_trajectories(run)
    cols = selection_columns(run)
    rows = [ClusterRow(c, int(sizes[c]), [int(after[c]) if c < len(after) else 0
                                          for _, after in cols],
                       dict(sorted(sources[c].items(), key=lambda kv: -kv[1])),
                       [float(x) for x in means[c]]) for c in range(k)]
    # The examples nearest each centroid: sort by (cluster, distance, id), keep the first few.
    dist = (labels["distance"] if "distance" in labels.column_names
            else pa.array(np.zeros(len(labels), np.float32)))
    order = np.lexsort((np.asarray(labels["id"].to_pylist(), dtype=object).astype(str),
                        dist.to_numpy(zero_copy_only=False), cl))
    first = np.r_[0, np.cumsum(sizes)[:-1]]
    rank = np.empty(len(order), np.int64)
    rank[order] = np.arange(len(order)) - first[cl[order]]
    keep = labels.filter(pa.array(rank < examples_per_cluster))
    examples = run / "ingest" / "examples"
    if examples.is_dir() and keep.num_rows:
        data = pads.dataset(str(examples), format="parquet")
        cols_x = [c for c in ("id", "prompt", "response", "raw") if c in data.schema.names]
        found = data.to_table(columns=cols_x, filter=pc.field("id").isin(keep["id"]))
        by_id = {r["id"]: r for r in found.to_pylist()}
        order_keep = sorted(zip(keep["cluster"].to_pylist(), rank[rank < examples_per_cluster],
                                keep["id"].to_pylist()))
        for c, _, i in order_keep:
            r = by_id.get(i)
            if r is None:
                continue
            inst, resp = _example_text(r.get("raw"), r.get("prompt") or "",
                                       r.get("response") or "")
            rows[c].examples.append({"id": i, "instruction": _clip(inst),
                                     "response": _clip(resp)})
    return rows


def sweep_tables(run: Path) -> list[tuple[str, list[str], list[list[str]]]]:
    """Per metric: (metric, budget column labels, rows of [method, cells...]) from the sweep's
    results, each cell 'mean ± std [min, max] (n seeds)'."""
    import pyarrow.parquet as pq

    from s2l_ray.stages.results import METRICS, summarize

    results = run / "sweep" / "results.parquet"
    if not (run / "sweep" / "_SUCCESS.json").is_file() or not results.is_file():
        return []
    rows = pq.read_table(results).to_pylist()
    metrics = tuple(m for m in METRICS if any(m in r for r in rows))
    summary = summarize(rows, metrics)
    sizes = sorted({r["size"] for r in summary})
    labels = []
    for s in sizes:
        r = next(x for x in summary if x["size"] == s)
        frac = r.get("fraction")
        labels.append(f"{s} ({frac:.0%})" if isinstance(frac, float) else str(s))
    methods = sorted({r["method"] for r in summary}, key=lambda m: (m == "full", m))
    out = []
    for m in metrics:
        body = []
        for method in methods:
            cells = [method]
            for s in sizes:
                r = next((x for x in summary if x["method"] == method and x["size"] == s), None)
                if r is None or r[f"{m}_seeds"] == 0:
                    cells.append("")
                    continue
                cells.append(f"{r[f'{m}_mean']:.3f} ± {r[f'{m}_std']:.3f} "
                             f"[{r[f'{m}_min']:.3f}, {r[f'{m}_max']:.3f}] "
                             f"({r[f'{m}_seeds']} seed{'s' * (r[f'{m}_seeds'] > 1)})")
            body.append(cells)
        out.append((m, labels, body))
    return out


# ---------------------------------------------------------------------------------------------
# rendering


def sparkline(values: list[float], lo: float, hi: float, overall: list[float] | None = None,
              w: int = 120, h: int = 32) -> str:
    """An inline SVG polyline of one trajectory on a shared [lo, hi] scale (numbers only)."""
    def pts(v: list[float]) -> str:
        if not v:
            return ""
        span = (hi - lo) or 1.0
        step = (w - 4) / max(1, len(v) - 1)
        return " ".join(f"{2 + i * step:.1f},{h - 2 - (h - 4) * (x - lo) / span:.1f}"
                        for i, x in enumerate(v) if np.isfinite(x))
    ref = (f'<polyline points="{pts(overall)}" fill="none" stroke="#bbb" '
           'stroke-dasharray="3,2" stroke-width="1"/>' if overall else "")
    return (f'<svg class="spark" width="{w}" height="{h}" viewBox="0 0 {w} {h}" role="img">'
            f'{ref}<polyline points="{pts(values)}" fill="none" stroke="#d62728" '
            'stroke-width="1.5"/></svg>')


def source_bar(sources: dict[str, int], colors: dict[str, str], w: int = 140,
               h: int = 12) -> str:
    total = max(1, sum(sources.values()))
    x, parts = 0.0, []
    for s, n in sources.items():
        width = w * n / total
        parts.append(f'<rect x="{x:.1f}" y="0" width="{width:.1f}" height="{h}" '
                     f'fill="{colors.get(s, "#999")}"><title>{esc(s)}: {n}</title></rect>')
        x += width
    top = ", ".join(f"{esc(s)} {n / total:.0%}" for s, n in list(sources.items())[:3])
    return (f'<svg width="{w}" height="{h}" viewBox="0 0 {w} {h}">{"".join(parts)}</svg>'
            f'<div class="small">{top}</div>')


CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px;color:#222;
max-width:1400px}
h1{font-size:1.5em}h2{margin-top:1.6em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:.5em 0}th,td{border:1px solid #ddd;padding:4px 8px;
vertical-align:top;text-align:left}th{background:#f4f4f4}td.num{text-align:right}
.small{font-size:.8em;color:#555}.t{white-space:nowrap}.missing{color:#999}pre{background:#f8f8f8;padding:8px;
overflow:auto;max-height:400px}img{width:100%;border:1px solid #eee;margin:6px 0}
figure{display:inline-block;width:48%;margin:0 1% 8px 0;vertical-align:top}
.ex{margin:4px 0;padding:4px;border-left:3px solid #ddd;white-space:pre-wrap;font-size:.85em}
.ex b{color:#555}button{margin-right:6px}button[aria-pressed=true]{font-weight:bold}
.legend span{display:inline-block;margin-right:10px}.sw{display:inline-block;width:10px;
height:10px;margin-right:3px}
"""

# Sorts the cluster table in place; `#sort=<key>-<asc|desc>` in the URL sorts on load.
SCRIPT = """
(function () {
  var body = document.getElementById("clusters-body");
  if (!body) { return; }
  function sortBy(spec) {
    var p = spec.split("-"), key = p[0], sign = p[1] === "asc" ? 1 : -1;
    var rows = Array.prototype.slice.call(body.rows);
    rows.sort(function (a, b) {
      var x = parseFloat(a.dataset[key]), y = parseFloat(b.dataset[key]);
      if (isNaN(x)) { x = -Infinity; } if (isNaN(y)) { y = -Infinity; }
      return sign * (x - y) || (parseInt(a.dataset.cluster) - parseInt(b.dataset.cluster));
    });
    rows.forEach(function (r) { body.appendChild(r); });
    body.setAttribute("data-sorted", spec);
    document.querySelectorAll("button[data-sort]").forEach(function (b) {
      b.setAttribute("aria-pressed", String(b.dataset.sort === spec));
    });
  }
  document.querySelectorAll("button[data-sort]").forEach(function (b) {
    b.addEventListener("click", function () { sortBy(b.dataset.sort); });
  });
  var m = /sort=((size|loss)-(asc|desc))/.exec(location.hash);
  sortBy(m ? m[1] : "size-desc");
})();
"""


def _table(head: list[str], rows: list[list[str]], *, raw: bool = False) -> str:
    """A table; cells are escaped unless `raw` (cells already rendered HTML)."""
    cell = (lambda c: c) if raw else esc
    th = "".join(f"<th>{esc(h)}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{cell(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>"


def render_overview(stages: list[dict[str, Any]]) -> str:
    rows = []
    for s in stages:
        if not s["done"]:
            rows.append([esc(s["stage"]), '<span class="missing">not run</span>', "", ""])
            continue
        nums = ", ".join(f"{esc(k)}: <b>{esc(_fmt(v))}</b>" for k, v in s["numbers"].items())
        secs = s["seconds"]
        rows.append([esc(s["stage"]), "done", f'<span class="t">{esc(_duration(secs))}</span>',
                     nums])
    out = _table(["stage", "status", "time", "counts and rates (report.json)"], rows, raw=True)
    ingest = next((s for s in stages if s["stage"] == "ingest" and s["done"]), None)
    rejects = (ingest or {}).get("report", {}).get("rejects") or {}
    if ingest:
        out += "<h3>Ingest rejects by reason</h3>"
        out += (_table(["reason", "rows"], [[r, _fmt(n)] for r, n in
                                            sorted(rejects.items(), key=lambda kv: -kv[1])])
                if rejects else "<p>No row was rejected.</p>")
    return out


def render_clusters(rows: list[ClusterRow], cols: list[str]) -> str:
    if not rows:
        return "<p>No finished cluster stage in this run.</p>"
    traj = np.array([r.trajectory for r in rows], dtype=float)
    sizes = np.array([r.size for r in rows], dtype=float)
    finite = traj[np.isfinite(traj)]
    lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    overall = ((traj * sizes[:, None]).sum(0) / max(1.0, sizes.sum())).tolist()
    names: dict[str, int] = {}
    for r in rows:
        for s, n in r.sources.items():
            names[s] = names.get(s, 0) + n
    colors = {s: PALETTE[i % len(PALETTE)] for i, s in enumerate(sorted(names,
                                                                          key=lambda s: -names[s]))}
    legend = "".join(f'<span><i class="sw" style="background:{c}"></i>{esc(s)}</span>'
                     for s, c in colors.items())
    head = ["cluster", "size", *cols, "sources", "mean loss trajectory", "mean loss",
            "examples nearest the centroid"]
    body = []
    for r in rows:
        taken = "".join(f'<td class="num">{r.taken[i]:,}'
                        f'<div class="small">{r.taken[i] / max(1, r.size):.0%}</div></td>'
                        for i in range(len(cols)))
        ex = "".join(f'<div class="ex"><b>instruction</b> {esc(e["instruction"])}\n'
                     f'<b>response</b> {esc(e["response"])}\n'
                     f'<span class="small">id {esc(e["id"])}</span></div>' for e in r.examples)
        first_last = (f"{r.trajectory[0]:.3f} → {r.trajectory[-1]:.3f}" if r.trajectory
                      else "")
        body.append(
            f'<tr data-cluster="{r.cluster}" data-size="{r.size}" data-loss="{r.mean_loss:.6g}">'
            f'<td class="num">{r.cluster}</td><td class="num">{r.size:,}</td>{taken}'
            f"<td>{source_bar(r.sources, colors)}</td>"
            f"<td>{sparkline(r.trajectory, lo, hi, overall)}</td>"
            f'<td class="num">{r.mean_loss:.4f}<div class="small">{first_last}</div></td>'
            f"<td><details><summary>{len(r.examples)} examples</summary>{ex}</details></td>"
            "</tr>")
    th = "".join(f"<th>{esc(h)}</th>" for h in head)
    return (f'<p>{len(rows)} clusters. Sort by <button data-sort="size-desc">size ↓</button>'
            '<button data-sort="size-asc">size ↑</button>'
            '<button data-sort="loss-desc">mean loss ↓</button>'
            '<button data-sort="loss-asc">mean loss ↑</button></p>'
            '<p class="small">Trajectories share one scale (red: the cluster; grey dashes: all '
            'examples). Mean loss: over the cluster\'s examples and the checkpoints. Selection '
            'columns: examples taken, and the share of the cluster.</p>'
            f'<div class="legend small">{legend}</div>'
            f'<table id="clusters"><thead><tr>{th}</tr></thead>'
            f'<tbody id="clusters-body">{"".join(body)}</tbody></table>')


def render_sweep(tables: list[tuple[str, list[str], list[list[str]]]]) -> str:
    if not tables:
        return "<p>No finished sweep in this run.</p>"
    out = ['<p class="small">Mean ± std over seeds [min, max]; higher is better for *_em, '
           'lower for *_loss. Columns: budget in examples (share of the data).</p>']
    for metric, labels, rows in tables:
        out.append(f"<h3>{esc(metric)}</h3>" + _table(["method", *labels], rows))
    return "".join(out)


def render_page(run: Path, stages: list[dict[str, Any]], config_text: str,
                sweep: list[tuple[str, list[str], list[list[str]]]], pngs: list[Path],
                clusters: list[ClusterRow], cols: list[str]) -> str:
    script_hash = base64.b64encode(hashlib.sha256(SCRIPT.encode()).digest()).decode()
    csp = ("default-src 'none'; img-src data:; style-src 'unsafe-inline'; "
           f"script-src 'sha256-{script_hash}'; base-uri 'none'; form-action 'none'")
    imgs = "".join(
        f'<figure><img alt="{esc(p.stem)}" src="data:image/png;base64,'
        f'{base64.b64encode(p.read_bytes()).decode()}"><figcaption class="small">{esc(p.name)}'
        "</figcaption></figure>" for p in pngs)
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f'<meta http-equiv="Content-Security-Policy" content="{csp}">'
        f"<title>s2l report: {esc(run.name)}</title><style>{CSS}</style></head><body>"
        f"<h1>s2l report: {esc(run)}</h1>"
        f'<nav class="small"><a href="#glance">at a glance</a> · <a href="#sweep">sweep</a> · '
        '<a href="#plots">plots</a> · <a href="#clusters-section">clusters</a> · '
        '<a href="#config">config</a></nav>'
        f'<h2 id="glance">The run at a glance</h2>{render_overview(stages)}'
        f'<h2 id="sweep">Sweep</h2>{render_sweep(sweep)}'
        f'<h2 id="plots">Plots</h2>{imgs or "<p>No plots.</p>"}'
        f'<h2 id="clusters-section">Clusters</h2>{render_clusters(clusters, cols)}'
        f'<h2 id="config">Config</h2><pre>{esc(config_text)}</pre>'
        f"<script>{SCRIPT}</script></body></html>\n")


def write_html_report(run_dir: str | Path, pngs: list[Path],
                      examples_per_cluster: int = EXAMPLES_PER_CLUSTER) -> Path:
    """Write RUN_DIR/report/index.html from the published stages and the given PNG files,
    showing the `examples_per_cluster` examples nearest each centroid."""
    run = Path(run_dir).expanduser().resolve()
    stages = stage_overview(run)
    config_text = ""
    for name in reversed(STAGES):  # the latest stage's snapshot holds every section
        f = run / name / "config.yaml"
        if (run / name / "_SUCCESS.json").is_file() and f.is_file():
            config_text = f.read_text(encoding="utf-8")
            break
    clusters: list[ClusterRow] = []
    cols: list[str] = []
    if (run / "cluster" / "_SUCCESS.json").is_file():
        clusters = cluster_rows(run, examples_per_cluster)
        cols = [label for label, _ in selection_columns(run)]
    page = render_page(run, stages, config_text, sweep_tables(run), pngs, clusters, cols)
    out = run / "report" / "index.html"
    out.parent.mkdir(exist_ok=True)
    tmp = out.with_suffix(".html.tmp")
    tmp.write_text(page, encoding="utf-8")
    tmp.replace(out)
    return out
