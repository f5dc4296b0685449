"""Stage `ingest`: instruction data -> validated, tokenized examples with stable ids (Parquet).

    files / HF data set --parse (tasks)--> raw rows --normalize+tokenize (actors)--> examples
                                                                                 \\-> rejects

Every input row ends in exactly one of `examples/` or `rejects/` (with a reason code and a
detail), and the report counts both, so nothing is dropped silently. Rows whose id repeats keep
the first occurrence (by file and row number, whatever the parallelism); the rest are rejected.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

from s2l_ray.config import S2LConfig
from s2l_ray.core.hashing import hash64
from s2l_ray.errors import S2LError

log = logging.getLogger(__name__)

EXAMPLE_COLUMNS = ["id", "source", "format", "prompt", "response", "input_ids", "n_prompt_tokens",
                   "n_tokens", "truncated", "raw", "origin_file", "origin_row"]
REJECT_COLUMNS = ["origin_file", "origin_row", "reject_reason", "reject_detail", "id", "source",
                  "raw"]


class IngestError(S2LError):
    """The input yields no usable example: the fix is in the data or the data.* keys."""


def _schema() -> Any:
    import pyarrow as pa

    return pa.schema([
        ("id", pa.string()), ("source", pa.string()), ("format", pa.string()),
        ("prompt", pa.string()), ("response", pa.string()),
        ("input_ids", pa.list_(pa.int32())), ("n_prompt_tokens", pa.int32()),
        ("n_tokens", pa.int32()), ("truncated", pa.bool_()),
        ("raw", pa.string()), ("origin_file", pa.string()), ("origin_row", pa.int64()),
        ("reject_reason", pa.string()), ("reject_detail", pa.string()),
    ])


_TOKENIZERS: dict[str, Any] = {}  # per worker process: tasks reuse processes, load once


def _tokenizer(path: str, trust_remote_code: bool) -> Any:
    if path not in _TOKENIZERS:
        from transformers import AutoTokenizer

        _TOKENIZERS[path] = AutoTokenizer.from_pretrained(path,
                                                          trust_remote_code=trust_remote_code)
    return _TOKENIZERS[path]


def normalize_batch(batch: Any, tokenizer_path: str, data_cfg: dict[str, Any],
                    trust_remote_code: bool = False) -> Any:
    """Raw rows -> examples (or rejects with reason): parse, template, id, tokenize."""
    import pyarrow as pa

    from s2l_ray.core import formats as formats
    from s2l_ray.core.tokens import tokenize_batch

    tok = _tokenizer(tokenizer_path, trust_remote_code)
    c = data_cfg
    out: dict[str, list[Any]] = {f.name: [] for f in _schema()}
    pending: list[tuple[int, formats.Example]] = []
    for r in batch.to_pylist():
        rec = {k: None for k in out}
        rec.update(origin_file=r["origin_file"], origin_row=r["origin_row"], raw=r["raw"],
                   reject_reason=r["reject_reason"], reject_detail=r["reject_detail"],
                   input_ids=[], n_prompt_tokens=0, n_tokens=0, truncated=False)
        if rec["reject_reason"] is None:
            try:
                row = json.loads(r["raw"])
                ex = formats.to_example(row, c["format"], c["template"])
                rec["id"] = (formats.given_id(row, c["id_column"]) if c["id_column"]
                             else formats.content_id(ex.content))
                rec["source"] = formats.row_source(row, c["source_column"])
                rec.update(format=ex.format, prompt=ex.prompt, response=ex.response)
                pending.append((len(out["id"]), ex))
            except formats.RowError as e:
                rec.update(reject_reason=e.reason, reject_detail=e.detail)
        for k, v in rec.items():
            out[k].append(v)
    if pending:
        tk = tokenize_batch(tok, [e.prompt for _, e in pending],
                            [e.response for _, e in pending], c["max_length"], c["overlong"])
        for (i, _), ids, npr, cut, err in zip(pending, tk.input_ids, tk.n_prompt,
                                              tk.truncated, tk.errors):
            if err:
                reason, _, detail = err.partition(": ")
                out["reject_reason"][i], out["reject_detail"][i] = reason, detail
            else:
                out["input_ids"][i], out["n_prompt_tokens"][i] = ids, npr
                out["n_tokens"][i], out["truncated"][i] = len(ids), cut
    return pa.table(out, schema=_schema())


def _stats(batch: Any) -> Any:
    """One row of partial counts per block; the driver adds them (no full collect)."""
    import pyarrow as pa

    rows = batch.select(["source", "n_tokens", "n_prompt_tokens", "truncated",
                         "reject_reason"]).to_pylist()
    s: dict[str, Any] = {"rows": len(rows), "valid": 0, "truncated": 0, "tokens": 0,
                         "response_tokens": 0, "max_tokens": 0, "rejects": {}, "sources": {}}
    for r in rows:
        if r["reject_reason"]:
            s["rejects"][r["reject_reason"]] = s["rejects"].get(r["reject_reason"], 0) + 1
            continue
        s["valid"] += 1
        s["truncated"] += bool(r["truncated"])
        s["tokens"] += r["n_tokens"]
        s["response_tokens"] += r["n_tokens"] - r["n_prompt_tokens"]
        s["max_tokens"] = max(s["max_tokens"], r["n_tokens"])
        src = r["source"] or "(none)"
        s["sources"][src] = s["sources"].get(src, 0) + 1
    return pa.table({"stats": [json.dumps(s)]})


def merge_stats(parts: list[dict[str, Any]]) -> dict[str, Any]:
    total: dict[str, Any] = {"rows": 0, "valid": 0, "truncated": 0, "tokens": 0,
                             "response_tokens": 0, "max_tokens": 0, "rejects": {}, "sources": {}}
    for s in parts:
        for k in ("rows", "valid", "truncated", "tokens", "response_tokens"):
            total[k] += s[k]
        total["max_tokens"] = max(total["max_tokens"], s["max_tokens"])
        for group in ("rejects", "sources"):
            for k, v in s[group].items():
                total[group][k] = total[group].get(k, 0) + v
    total["rejected"] = sum(total["rejects"].values())
    return total


def _keep(batch: Any, valid: bool) -> Any:
    import pyarrow.compute as pc

    mask = pc.is_null(batch["reject_reason"])
    return batch.filter(mask if valid else pc.invert(mask))


def _id_hashes(batch: Any) -> Any:
    import pyarrow as pa

    ids = _keep(batch, valid=True)["id"].to_pylist()
    return pa.table({"h": pa.array([hash64(i) for i in ids], pa.uint64())})


def _rows_with_hashes(batch: Any, hashes: frozenset[int]) -> Any:
    valid = _keep(batch, valid=True).select(["id", "origin_file", "origin_row"])
    keep = [hash64(i) in hashes for i in valid["id"].to_pylist()]
    return valid.filter(keep)


def _mark_losers(batch: Any, losers: dict[tuple[str, int], str]) -> Any:
    import pyarrow as pa

    if not losers:
        return batch
    files, rows = batch["origin_file"].to_pylist(), batch["origin_row"].to_pylist()
    reason, detail = batch["reject_reason"].to_pylist(), batch["reject_detail"].to_pylist()
    for i, key in enumerate(zip(files, rows)):
        if key in losers and reason[i] is None:
            reason[i], detail[i] = "duplicate_id", f"id already used by {losers[key]}"
    batch = batch.set_column(batch.schema.get_field_index("reject_reason"), "reject_reason",
                             pa.array(reason, pa.string()))
    return batch.set_column(batch.schema.get_field_index("reject_detail"), "reject_detail",
                            pa.array(detail, pa.string()))


def duplicate_losers(norm: Any, policy: str) -> dict[tuple[str, int], str]:
    """Rows to reject because their id was used by an earlier row (by file, then row number).

    Only 8-byte id hashes and then the few colliding rows' (id, file, row) reach the driver;
    the decision depends on origins alone, so it is the same for any block layout.
    """
    import numpy as np
    import pyarrow as pa
    import ray

    tables = ray.get(norm.map_batches(_id_hashes, batch_format="pyarrow").to_arrow_refs())
    tables = [t for t in tables if t.num_rows]  # blocks of empty input carry no columns at all
    h = pa.concat_tables(tables)["h"].to_numpy() if tables else np.zeros(0, np.uint64)
    uniq, counts = np.unique(h, return_counts=True)
    repeated = frozenset(int(x) for x in uniq[counts > 1])
    if not repeated:
        return {}
    cand = pa.concat_tables(ray.get(norm.map_batches(
        _rows_with_hashes, batch_format="pyarrow", fn_kwargs={"hashes": repeated}
    ).to_arrow_refs())).to_pylist()
    groups: dict[str, list[tuple[str, int]]] = {}
    for r in cand:
        groups.setdefault(r["id"], []).append((r["origin_file"], r["origin_row"]))
    groups = {k: sorted(v) for k, v in groups.items() if len(v) > 1}  # drop hash collisions
    if groups and policy == "error":
        raise IngestError(f"{len(groups)} ids repeat (e.g. {list(groups)[:3]}); with "
                          "data.duplicates=error that is fatal. Fix: dedupe the input, or set "
                          "data.duplicates=reject to keep each id's first row")
    log.info("ingest: %d ids repeat; keeping the first row of each", len(groups))
    return {o: f"{v[0][0]}:{v[0][1]}" for v in groups.values() for o in v[1:]}


def run(cfg: S2LConfig, inputs: dict[str, Path], tmp: Path) -> dict[str, Any]:
    """Read `data.source`, validate, tokenize, dedupe into examples/ and rejects/ in `tmp`;
    returns the report."""
    from s2l_ray.io.readers import read_raw
    from s2l_ray.models.specs import resolve_model, tokenizer_spec

    source = cfg.data.source
    if source == "demo:mathmix":
        from s2l_ray.demo.data import write_mathmix

        d = cfg.demo
        paths = write_mathmix(tmp / "demo_data", n_train=d.n_train,
                              n_test_per_source=d.n_test_per_source, seed=d.seed)
        source = paths["train"]
    tok_path = resolve_model(tokenizer_spec(cfg), cfg)
    norm = read_raw(source, cfg.data.split).map_batches(
        normalize_batch, batch_format="pyarrow", batch_size=1024,
        fn_kwargs={"tokenizer_path": tok_path, "data_cfg": vars(cfg.data),
                   "trust_remote_code": cfg.reference.trust_remote_code},
    ).materialize()
    losers = duplicate_losers(norm, cfg.data.duplicates)
    final = norm.map_batches(_mark_losers, batch_format="pyarrow",
                             fn_kwargs={"losers": losers}).materialize() if losers else norm
    stats = merge_stats([json.loads(r["stats"]) for r in
                         final.map_batches(_stats, batch_format="pyarrow").take_all()])
    if stats["valid"] == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        if stats["rows"] == 0:
            raise IngestError(f"'{cfg.data.source}' has no rows at all (empty files?). Fix: "
                              "point data.source at files that hold data")
        top = sorted(stats["rejects"].items(), key=lambda kv: -kv[1])[:5]
        raise IngestError(f"'{cfg.data.source}' has no valid rows ({stats['rows']} read; "
                          f"reasons: {top}). Fix: check data.format and the field names")
    final.map_batches(_keep, batch_format="pyarrow", fn_kwargs={"valid": True}).select_columns(
        EXAMPLE_COLUMNS).write_parquet(str(tmp / "examples"))
    if stats["rejected"]:
        final.map_batches(_keep, batch_format="pyarrow", fn_kwargs={"valid": False}
                          ).select_columns(REJECT_COLUMNS).write_parquet(str(tmp / "rejects"))
    for reason, n in sorted(stats["rejects"].items()):
        log.warning("ingest: rejected %d rows: %s (see %s)", n, reason,
                    Path(cfg.run.output_dir) / "ingest" / "rejects")
    log.info("ingest: %d valid examples, %d rejected, %d truncated, %d tokens",
             stats["valid"], stats["rejected"], stats["truncated"], stats["tokens"])
    return {"source": cfg.data.source, "tokenizer": tok_path, **stats}
