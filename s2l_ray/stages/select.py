"""Stage `select`: spend the budget with S2L or a baseline (s2l_ray.core.selection), over files.

    cluster/assignments/*.parquet --count (Ray tasks)--> cluster and source sizes -> quotas
    assignments (s2l, random, stratified) or trajectories (loss baselines)
        --per file (Ray tasks): top quota per group by (score, hash(seed, id))--> candidates
    driver: the same top-per-group over the candidates -> exactly B ids (budget-sized)
    ingest/examples/*.parquet --rows whose id was selected (Ray tasks)--> selected.jsonl

    select/selected.parquet   id, cluster, source; in selection order (cluster/group, rank)
    select/selected.jsonl     the selected rows in their ORIGINAL format (ingest's `raw`), same
                              order: ready for any SFT trainer
    select/report.json        method, budget, per-cluster and per-source counts before/after

Each file contributes its own top candidates and the driver ranks their union, so the result is
the one `selection.select` gives on all the data at once, whatever the files or workers.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from s2l_ray.config import S2LConfig, SelectConfig
from s2l_ray.errors import S2LError
from s2l_ray.io.parquet import map_files

log = logging.getLogger(__name__)
BATCH = 65536  # rows read at a time by a task
NONE = "(none)"  # how a missing source is named in reports


def _batches(path: str, columns: list[str]) -> Any:
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(path)
    have = [c for c in columns if c in pf.schema_arrow.names]
    for b in pf.iter_batches(batch_size=BATCH, columns=have):
        yield b, have


def count_file(path: str) -> list[tuple[int, str | None, int]]:
    """(cluster, source, rows) of one assignments file."""
    import pyarrow as pa

    parts = []
    for b, have in _batches(path, ["cluster", "source"]):
        t = pa.Table.from_batches([b])
        if "source" not in have:
            t = t.append_column("source", pa.nulls(len(t), pa.string()))
        parts.append(t.group_by(["cluster", "source"]).aggregate([([], "count_all")]))
    if not parts:
        return []
    g = pa.concat_tables(parts).group_by(["cluster", "source"]).aggregate(
        [("count_all", "sum")])
    return list(zip(g["cluster"].to_pylist(), g["source"].to_pylist(),
                    g["count_all_sum"].to_pylist()))


def _top(t: Any, quotas: np.ndarray) -> Any:
    from s2l_ray.core.kmeans import IdView
    from s2l_ray.core.selection import top_per_group

    idx = top_per_group(t["group"].to_numpy(), t["score"].to_numpy(), t["hash"].to_numpy(),
                        IdView(t["id"]), quotas)
    return t.take(idx)


def candidates_file(path: str, spec: dict[str, Any]) -> Any:
    """This file's top quota rows per group: id, group, score, hash, cluster, source."""
    import pyarrow as pa

    from s2l_ray.core.selection import LOSS_METHODS, id_hashes, loss_scores
    from s2l_ray.io.parquet import losses_matrix

    method, quotas = spec["method"], np.asarray(spec["quotas"])
    lossy = method in LOSS_METHODS
    cols = ["id", "source", "losses"] if lossy else ["id", "cluster", "source"]
    kept, held = [], 0
    for b, have in _batches(path, cols):
        n = b.num_rows
        ids = b.column("id").to_pylist()
        src = b.column("source") if "source" in have else pa.nulls(n, pa.string())
        score = np.zeros(n)
        group = np.zeros(n, np.int64)
        cluster = pa.nulls(n, pa.int32())
        if lossy:
            score = loss_scores(losses_matrix(b.column("losses"), path), method,
                                median=spec.get("median"), early_fraction=spec["early_fraction"])
        else:
            cluster = b.column("cluster").cast(pa.int32())
            if method == "s2l":
                group = cluster.to_numpy().astype(np.int64)
            elif method == "stratified":
                where = spec["source_index"]
                group = np.fromiter((where[s if s is not None else NONE]
                                     for s in src.to_pylist()), np.int64, count=n)
        t = pa.table({"id": pa.array(ids, pa.string()), "group": group, "score": score,
                      "hash": id_hashes(ids, spec["seed"]), "cluster": cluster,
                      "source": src.cast(pa.string())})
        kept.append(_top(t, quotas))
        held += kept[-1].num_rows
        if held > 2 * int(quotas.sum()):  # keep what a task holds near the budget
            kept = [_top(pa.concat_tables(kept), quotas)]
            held = kept[0].num_rows
    return _top(pa.concat_tables(kept), quotas) if kept else None


def final_losses_file(path: str) -> np.ndarray:
    """The last checkpoint's loss of every row of one trajectories file, (n,) float32."""
    from s2l_ray.io.parquet import losses_matrix

    parts = [losses_matrix(b.column("losses"), path)[:, -1] for b, _ in
             _batches(path, ["losses"])]
    return np.concatenate(parts) if parts else np.zeros(0, np.float32)


def rows_with_ids(path: str, ids: list[str], columns: list[str]) -> Any:
    """The rows of one Parquet file whose id is in `ids` (a budget-sized list)."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.dataset as pads

    return pads.dataset(path, format="parquet").to_table(
        columns=columns, filter=pc.field("id").isin(pa.array(ids, pa.string())))


def select_from(cluster_dir: str | Path, trajectories_dir: str | Path,
                examples_dir: str | Path, out_dir: str | Path, s: SelectConfig,
                seed: int) -> dict[str, Any]:
    """Select from a cluster stage's outputs; write selected.parquet/.jsonl; return the report.
    A bad budget or method fails naming its select.* key. Ray must be initialised."""
    from s2l_ray.errors import config_keys

    with config_keys("select"):
        return _select_from(cluster_dir, trajectories_dir, examples_dir, out_dir, s, seed)


def _select_from(cluster_dir: str | Path, trajectories_dir: str | Path,
                examples_dir: str | Path, out_dir: str | Path, s: SelectConfig,
                seed: int) -> dict[str, Any]:
    """Select from a cluster stage's outputs; write selected.parquet/.jsonl; return the report.

    Ray must be initialised.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    from s2l_ray.core.selection import LOSS_METHODS, resolve_budget, s2l_quotas, stratified_quotas
    from s2l_ray.io.parquet import parquet_files

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    label_files = parquet_files(Path(cluster_dir) / "assignments", "cluster")
    k = int(np.load(Path(cluster_dir) / "centroids.npy", mmap_mode="r").shape[0])
    sizes, by_source = np.zeros(k, np.int64), {}
    for part in map_files(count_file, label_files):
        for c, src, cnt in part:
            sizes[c] += cnt
            by_source[src if src is not None else NONE] = by_source.get(
                src if src is not None else NONE, 0) + cnt
    n = int(sizes.sum())
    b = resolve_budget(s.budget, n)
    names = sorted(by_source)
    spec: dict[str, Any] = {"method": s.method, "seed": seed, "quotas": [b],
                            "early_fraction": s.early_fraction}
    extra: dict[str, Any] = {}
    if s.method == "s2l":
        spec["quotas"] = s2l_quotas(sizes, b).tolist()
        extra["quotas"] = spec["quotas"]
    elif s.method == "stratified":
        spec["source_index"] = {name: i for i, name in enumerate(names)}
        spec["quotas"] = stratified_quotas([by_source[x] for x in names], b).tolist()
        extra["quotas"] = dict(zip(names, spec["quotas"]))
    files = label_files
    if s.method in LOSS_METHODS:
        files = parquet_files(trajectories_dir, "trajectories")
        if s.method == "middle_perplexity":  # needs the median over all: n floats, not n x T
            spec["median"] = float(np.median(np.concatenate(map_files(final_losses_file, files))))
            extra["median_final_loss"] = spec["median"]
    cands = [c for c in map_files(candidates_file, files, spec) if c is not None]
    chosen = _top(pa.concat_tables(cands), np.asarray(spec["quotas"]))
    ids = chosen["id"].to_pylist()
    if len(ids) != b or len(set(ids)) != b:
        raise RuntimeError(f"select: expected {b} distinct ids, got {len(set(ids))} of "
                           f"{len(ids)} (do the trajectories and assignments match?)")
    clusters = chosen["cluster"].to_pylist()
    if s.method in LOSS_METHODS:  # candidates came from the trajectories: look the clusters up
        found = pa.concat_tables(map_files(rows_with_ids, label_files, ids, ["id", "cluster"]))
        where = dict(zip(found["id"].to_pylist(), found["cluster"].to_pylist()))
        clusters = [where.get(i) for i in ids]
    table = pa.table({"id": pa.array(ids, pa.string()),
                      "cluster": pa.array(clusters, pa.int32()),
                      "source": chosen["source"].cast(pa.string())})
    pq.write_table(table, out / "selected.parquet")
    raw_parts = map_files(rows_with_ids, parquet_files(examples_dir, "ingest"), ids, ["id", "raw"])
    raw = pa.concat_tables(raw_parts)
    by_id = dict(zip(raw["id"].to_pylist(), raw["raw"].to_pylist()))
    missing = [i for i in ids if i not in by_id]
    if missing:
        raise S2LError(f"select: {len(missing)} selected ids are not in {examples_dir} (e.g."
                           f" {missing[:3]}); the ingest and trajectory stages disagree. Fix: "
                           "rerun them with the same config (run.overwrite=true)")
    with open(out / "selected.jsonl", "w", encoding="utf-8") as f:
        for i in ids:
            f.write(by_id[i].rstrip("\n") + "\n")
    after_src: dict[str, int] = {}
    for src in table["source"].to_pylist():
        after_src[src or NONE] = after_src.get(src or NONE, 0) + 1
    after_cl = np.bincount([c for c in clusters if c is not None], minlength=k)
    report = {"method": s.method, "budget": s.budget, "selected": b, "examples": n,
              "seed": seed, **extra,
              "clusters": {"before": sizes.tolist(), "after": after_cl.tolist()},
              "sources": {"before": dict(sorted(by_source.items())),
                          "after": dict(sorted(after_src.items()))}}
    log.info("select: %s chose %d of %d examples (%d clusters hit, %d sources)", s.method, b, n,
             int((after_cl > 0).sum()), len(after_src))
    return report


def run(cfg: S2LConfig, inputs: dict[str, Path], tmp: Path) -> dict[str, Any]:
    """Spend select.budget over the cluster stage's outputs into `tmp`; returns the report."""
    return select_from(inputs["cluster"], inputs["trajectories"], inputs["ingest"] / "examples",
                       tmp, cfg.select, cfg.run.seed)
