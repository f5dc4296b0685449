"""Stage `ingest`: instruction data -> validated, tokenized examples with stable ids (Parquet).

    files --plan (driver: JSON Lines cut at line ends by counting newlines, Parquet at row
        offsets, JSON arrays and CSV whole)--> ranges of ~ROWS_PER_PART rows, each with the
        number of its first row
    a task per range: parse --> normalize+tokenize+write (parts of <= ROWS_PER_PART rows)
        --> examples/part-*.parquet + rejects/part-*.parquet, and one summary row per part
    (an HF data set: blocks of raw rows --> the same normalize+write, ROWS_PER_PART rows a part)
    driver: per part, its counts and 8-byte id hashes --> repeated ids --> the few parts holding
        them rewritten in place (later rows moved to rejects/, reason duplicate_id)

The driver never holds the rows: its memory grows by 8 bytes per valid row (the id hashes). A
task holds one part (ROWS_PER_PART rows), and no raw row goes through the object store (a task
parses the very rows it normalizes). Part files are named by their first row's origin (file
rank, row number), so their sorted order is the input order whatever the parallelism or the
ranges. A part's counts reach the driver (and its progress line) when its task ends.

Every input row ends in exactly one of `examples/` or `rejects/` (with a reason code and a
detail), and the report counts both, so nothing is dropped silently. Rows whose id repeats keep
the first occurrence (by file and row number, whatever the parallelism); the rest are rejected.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from s2l_ray.config import S2LConfig
from s2l_ray.core.hashing import hash64
from s2l_ray.errors import S2LError
from s2l_ray.io.readers import RANGE_ROWS, FileRange

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
    """Raw rows -> examples (or rejects with reason): parse, template, id, tokenize.

    Each row's JSON is decoded once; the token ids come back as flat arrays
    (core.tokens.tokenize_arrays) and become the Arrow list column without per-row lists."""
    import numpy as np
    import pyarrow as pa

    from s2l_ray.core import formats as formats
    from s2l_ray.core.tokens import tokenize_arrays

    tok = _tokenizer(tokenizer_path, trust_remote_code)
    c = data_cfg
    n = batch.num_rows
    raws = batch["raw"].to_pylist()
    reason = batch["reject_reason"].to_pylist()
    detail = batch["reject_detail"].to_pylist()
    ids: list[str | None] = [None] * n
    sources: list[str | None] = [None] * n
    fmts: list[str | None] = [None] * n
    prompts: list[str | None] = [None] * n
    responses: list[str | None] = [None] * n
    pending: list[int] = []  # rows parsed into an example, to tokenize
    for i, raw in enumerate(raws):
        if reason[i] is not None:
            continue
        try:
            row = json.loads(raw)
            ex = formats.to_example(row, c["format"], c["template"])
            ids[i] = (formats.given_id(row, c["id_column"]) if c["id_column"]
                      else formats.content_id(ex.content))
            sources[i] = formats.row_source(row, c["source_column"])
            fmts[i], prompts[i], responses[i] = ex.format, ex.prompt, ex.response
            pending.append(i)
        except formats.RowError as e:
            reason[i], detail[i] = e.reason, e.detail
    lengths = np.zeros(n, np.int64)
    n_prompt = np.zeros(n, np.int32)
    truncated = np.zeros(n, bool)
    values = np.zeros(0, np.int32)
    if pending:
        tk = tokenize_arrays(tok, [prompts[i] for i in pending],
                             [responses[i] for i in pending], c["max_length"], c["overlong"])
        at = np.asarray(pending, np.int64)
        ok = np.array([e is None for e in tk.errors])
        lengths[at] = np.diff(tk.offsets)  # 0 for a row the tokenizing rejected
        n_prompt[at[ok]] = tk.n_prompt[ok]
        truncated[at] = tk.truncated
        values = tk.values
        for i, err in zip(pending, tk.errors):
            if err:
                reason[i], _, detail[i] = err.partition(": ")
    offsets = np.zeros(n + 1, np.int32)  # < 2^31 ids: a part holds ROWS_PER_PART rows
    np.cumsum(lengths, out=offsets[1:])
    cols = {"id": ids, "source": sources, "format": fmts, "prompt": prompts,
            "response": responses,
            "input_ids": pa.ListArray.from_arrays(pa.array(offsets), pa.array(values)),
            "n_prompt_tokens": n_prompt, "n_tokens": lengths.astype(np.int32),
            "truncated": truncated, "raw": batch["raw"], "origin_file": batch["origin_file"],
            "origin_row": batch["origin_row"], "reject_reason": reason,
            "reject_detail": detail}
    schema = _schema()
    return pa.Table.from_arrays([
        v.cast(f.type) if isinstance(v, pa.ChunkedArray) else pa.chunked_array(
            [v if isinstance(v, pa.Array) else pa.array(v, f.type)], f.type)
        for f, v in ((f, cols[f.name]) for f in schema)], schema=schema)


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


ROWS_PER_PART = RANGE_ROWS  # rows per range read by one task, and at most per part file
NORMALIZE_BATCH = 1024  # rows per tokenizer call inside a part


def part_name(origin_file: str, origin_row: int, origins: dict[str, int]) -> str:
    """A part's file name from its first row: sorted names follow the input order (file, then
    row) whatever the parallelism, so readers see the rows in one order on every run."""
    i = origins.get(origin_file)
    tag = f"{i:05d}" if i is not None else f"h{hash64(origin_file) % 10**12:012d}"
    return f"part-{tag}-{origin_row:012d}.parquet"


def _write(table: Any, path: Path) -> None:
    """Write a Parquet file under a hidden temporary name, then rename it into place: a reader
    (or a rerun) never sees half a file; a retried task replaces it with the same rows."""
    import pyarrow.parquet as pq

    part = path.with_name(f".{path.name}.tmp")
    pq.write_table(table, str(part))
    os.replace(part, path)


def _columns(table: Any, names: list[str]) -> Any:
    import pyarrow as pa

    schema = _schema()
    return table.select(names).cast(pa.schema([schema.field(n) for n in names]))


def normalize_part(batch: Any, out_dir: str, origins: dict[str, int], tokenizer_path: str,
                   data_cfg: dict[str, Any], trust_remote_code: bool = False) -> Any:
    """One task's rows: normalize (in tokenizer batches), write examples/ and rejects/ parts,
    and return one summary row: the part's name, its stats, and the 8-byte hashes of its valid
    ids (for the duplicate check). Only the summary reaches the driver."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    if batch.num_rows == 0:
        return pa.table({"part": pa.array([], pa.string()), "stats": pa.array([], pa.string()),
                         "hashes": pa.array([], pa.list_(pa.uint64()))})
    norm = pa.concat_tables([
        normalize_batch(batch.slice(i, NORMALIZE_BATCH), tokenizer_path, data_cfg,
                        trust_remote_code) for i in range(0, batch.num_rows, NORMALIZE_BATCH)])
    name = part_name(norm["origin_file"][0].as_py(), norm["origin_row"][0].as_py(), origins)
    valid = pc.is_null(norm["reject_reason"])
    good, bad = norm.filter(valid), norm.filter(pc.invert(valid))
    out = Path(out_dir)
    if good.num_rows:
        _write(_columns(good, EXAMPLE_COLUMNS), out / "examples" / name)
    if bad.num_rows:
        _write(_columns(bad, REJECT_COLUMNS), out / "rejects" / name)
    hashes = np.array([hash64(i) for i in good["id"].to_pylist()], np.uint64)
    return pa.table({"part": [name], "stats": _stats(norm)["stats"],
                     "hashes": pa.array([hashes], pa.list_(pa.uint64()))})


def ingest_range(span: FileRange, rows_per_part: int, max_row_bytes: int,
                 **normalize: Any) -> Iterator[Any]:
    """One task: parse one range of a file and normalize+write its rows as parts of at most
    `rows_per_part` rows (normalize_part, given `normalize` as its other arguments), yielding
    each part's summary. No raw row leaves the task."""
    import pyarrow as pa

    from s2l_ray.io.readers import parse_file

    held: list[Any] = []  # raw-row blocks not yet normalized (< rows_per_part rows)
    n = 0
    for block in parse_file(span.path, max_row_bytes=max_row_bytes, span=span):
        held.append(block)
        n += block.num_rows
        while n >= rows_per_part:
            rows = pa.concat_tables(held)
            yield normalize_part(rows.slice(0, rows_per_part), **normalize)
            held, n = [rows.slice(rows_per_part)], n - rows_per_part
    if n:
        yield normalize_part(pa.concat_tables(held), **normalize)


def _range_task(span: FileRange, rows_per_part: int, max_row_bytes: int,
                normalize: dict[str, Any]) -> list[Any]:
    return list(ingest_range(span, rows_per_part, max_row_bytes, **normalize))


def range_summaries(ranges: list[FileRange], rows_per_part: int, max_row_bytes: int,
                    normalize: dict[str, Any]) -> Iterator[Any]:
    """Run ingest_range on every range, one Ray task each, and yield the part summaries as the
    tasks end. Plain tasks, not a Ray Data read: their results are a few bytes, so there is no
    backpressure to keep, and Ray Data's executor (its driver loop, its stats and autoscaling
    actors: ~8 of ~150 core-seconds) made the stage slower on the 2-core machine (262,144 JSONL
    rows, same session: 71.4-71.7 s with plain tasks, 79.1 s as a Ray Data read). Two tasks per
    cluster CPU are in flight (the raylet starts a queued one the moment a slot frees; the
    driver never holds more than that many results); `normalize` (with the part files'
    origins, one entry per file) is put in the object store once."""
    import ray

    task = ray.remote(num_cpus=1)(_range_task)
    shared = ray.put(normalize)
    todo = iter(ranges)
    limit = max(2, 2 * int(ray.cluster_resources().get("CPU", 1)))
    running = [task.remote(r, rows_per_part, max_row_bytes, shared)
               for r in itertools.islice(todo, limit)]
    try:
        while running:
            done, running = ray.wait(running, num_returns=1)
            running += [task.remote(r, rows_per_part, max_row_bytes, shared)
                        for r in itertools.islice(todo, 1)]
            yield from ray.get(done[0])
    except BaseException:  # a task failed (or the caller stopped): the others write no more
        for ref in running:
            ray.cancel(ref)
        raise


def _part_candidates(path: str, hashes: frozenset[int]) -> list[dict[str, Any]]:
    """(id, origin_file, origin_row) of the rows of one examples part whose id hash repeats."""
    import pyarrow.parquet as pq

    t = pq.read_table(path, columns=["id", "origin_file", "origin_row"])
    return t.filter([hash64(i) in hashes for i in t["id"].to_pylist()]).to_pylist()


def _drop_losers(out_dir: str, name: str, losers: dict[tuple[str, int], str]) -> str:
    """Move one part's duplicate rows from examples/ to rejects/ (reason duplicate_id), each
    file replaced atomically; returns the part's stats (JSON) as its rows now are."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    out = Path(out_dir)
    ex = pq.read_table(str(out / "examples" / name))
    nulls = pa.nulls(ex.num_rows, pa.string())
    ex = _mark_losers(ex.append_column("reject_reason", nulls).append_column(
        "reject_detail", nulls), losers)
    valid = pc.is_null(ex["reject_reason"])
    kept, lost = ex.filter(valid), ex.filter(pc.invert(valid))
    rej_path = out / "rejects" / name
    old = pq.read_table(str(rej_path)) if rej_path.is_file() else None
    # in row order (a part holds one file's rows), as if the duplicates had been rejected
    # where they were read: the same rows in the same order whatever the part boundaries
    _write(pa.concat_tables([t for t in (old, _columns(lost, REJECT_COLUMNS)) if t is not None])
           .sort_by("origin_row"), rej_path)
    if kept.num_rows:
        _write(_columns(kept, EXAMPLE_COLUMNS), out / "examples" / name)
    else:
        (out / "examples" / name).unlink()
    stats = json.loads(_stats(kept)["stats"][0].as_py())  # the valid rows' figures, exact
    for r in [*(old["reject_reason"].to_pylist() if old is not None else []),
              *lost["reject_reason"].to_pylist()]:
        stats["rows"] += 1
        stats["rejects"][r] = stats["rejects"].get(r, 0) + 1
    return json.dumps(stats)


def dedupe_parts(out_dir: Path, hashes: dict[str, Any], policy: str) -> dict[str, str]:
    """Reject rows whose id was used by an earlier row (by file, then row number), part files
    rewritten in place. `hashes`: part name -> its valid ids' 8-byte hashes (numpy). Only the
    hashes and then the few colliding rows' (id, file, row) reach the driver; the decision
    depends on origins alone, so it is the same for any block layout. Returns the new stats
    (JSON) of the parts rewritten."""
    import numpy as np
    import ray

    every = np.concatenate(list(hashes.values())) if hashes else np.zeros(0, np.uint64)
    uniq, counts = np.unique(every, return_counts=True)
    repeated = uniq[counts > 1]
    if not len(repeated):
        return {}
    touched = [n for n, h in hashes.items() if np.isin(h, repeated).any()]
    rep = frozenset(int(x) for x in repeated)
    task = ray.remote(_part_candidates)
    found = ray.get([task.remote(str(out_dir / "examples" / n), rep) for n in touched])
    groups: dict[str, list[tuple[str, int]]] = {}
    where: dict[tuple[str, int], str] = {}  # origin -> the part holding it
    for n, rows in zip(touched, found):
        for r in rows:
            where[(r["origin_file"], r["origin_row"])] = n
            groups.setdefault(r["id"], []).append((r["origin_file"], r["origin_row"]))
    groups = {k: sorted(v) for k, v in groups.items() if len(v) > 1}  # drop hash collisions
    if not groups:
        return {}
    if policy == "error":
        raise IngestError(f"{len(groups)} ids repeat (e.g. {list(groups)[:3]}); with "
                          "data.duplicates=error that is fatal. Fix: dedupe the input, or set "
                          "data.duplicates=reject to keep each id's first row")
    log.info("ingest: %d ids repeat; keeping the first row of each", len(groups))
    losers = {o: f"{v[0][0]}:{v[0][1]}" for v in groups.values() for o in v[1:]}
    by_part: dict[str, dict[tuple[str, int], str]] = {}
    for o, winner in losers.items():
        by_part.setdefault(where[o], {})[o] = winner
    drop = ray.remote(_drop_losers)
    names = sorted(by_part)
    return dict(zip(names, ray.get([drop.remote(str(out_dir), n, by_part[n]) for n in names])))


def origin_order(source: str, split: str) -> dict[str, int]:
    """Each origin (input file, or the HF data set) -> its rank in the input's order."""
    if source.startswith("hf:"):
        return {f"{source}:{split}": 0}
    from s2l_ray.io.readers import list_files

    return {f: i for i, f in enumerate(list_files(source))}


def normalize_to_parts(cfg: S2LConfig, source: str, tok_path: str, out: Path,
                       rows_per_part: int = ROWS_PER_PART
                       ) -> tuple[dict[str, Any], dict[str, Any]]:
    """One streaming pass: read, normalize and write examples/ and rejects/ parts (in the
    tasks), then reject duplicated ids in place. The driver holds only per-part summaries (a
    few numbers and 8 bytes per valid row), never the rows. Returns (stats, progress).

    Files are cut into ranges of about `rows_per_part` rows (readers.plan_ranges: JSON Lines at
    line ends, Parquet at row offsets; JSON arrays and CSV whole) and each range is one task
    that parses its rows and normalizes and writes them (ingest_range, parts of at most
    `rows_per_part` rows), so no raw row goes through the object store and every CPU slot
    normalizes from the first task on. A Hugging Face data set is read in blocks, then
    normalized in parts of `rows_per_part` rows. Each part's counts reach the driver, hence the
    progress line, when its task ends (a whole-file range's several parts together)."""
    import numpy as np
    import pyarrow.compute as pc
    import ray.data

    from s2l_ray.io.readers import list_files, plan_ranges, read_raw
    from s2l_ray.stages.progress import stage_progress

    ray.data.DataContext.get_current().max_errored_blocks = 0
    for sub in ("examples", "rejects"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    normalize = {"out_dir": str(out), "origins": origin_order(source, cfg.data.split),
                 "tokenizer_path": tok_path, "data_cfg": vars(cfg.data),
                 "trust_remote_code": cfg.reference.trust_remote_code}
    if source.startswith("hf:"):
        raw = read_raw(source, cfg.data.split, cfg.data.max_row_bytes)
        # Blocks reach the parts in input order, so each part holds consecutive rows and the
        # parts are cut at the same rows on every run (the bundling is by row counts alone).
        raw.context.execution_options.preserve_order = True
        summaries = raw.map_batches(normalize_part, batch_format="pyarrow",
                                    batch_size=rows_per_part, fn_kwargs=normalize).iter_batches(
            batch_size=None, batch_format="pyarrow")
    else:
        summaries = range_summaries(plan_ranges(list_files(source), rows_per_part),
                                    rows_per_part, cfg.data.max_row_bytes, normalize)
    parts: dict[str, str] = {}
    hashes: dict[str, Any] = {}
    with stage_progress(cfg, "ingest", None, "rows") as progress:
        for batch in summaries:
            for i, name in enumerate(batch["part"].to_pylist()):
                parts[name] = batch["stats"][i].as_py()
                hashes[name] = pc.list_flatten(batch["hashes"].slice(i, 1)).to_numpy(
                    zero_copy_only=False).astype(np.uint64)
                progress.add(json.loads(parts[name])["rows"])
    parts.update(dedupe_parts(out, hashes, cfg.data.duplicates))
    for sub in ("examples", "rejects"):
        for left in (out / sub).glob(".*.tmp"):  # a task killed mid-write, since retried
            left.unlink()
        if not any((out / sub).iterdir()):
            (out / sub).rmdir()
    return merge_stats([json.loads(v) for v in parts.values()]), progress.stop()


def run(cfg: S2LConfig, inputs: dict[str, Path], tmp: Path) -> dict[str, Any]:
    """Read `data.source`, validate, tokenize, dedupe into examples/ and rejects/ in `tmp`;
    returns the report."""
    from s2l_ray.models.specs import resolve_model, tokenizer_spec

    source = cfg.data.source
    if source == "demo:mathmix":
        from s2l_ray.demo.data import write_mathmix

        d = cfg.demo
        paths = write_mathmix(tmp / "demo_data", n_train=d.n_train,
                              n_test_per_source=d.n_test_per_source, seed=d.seed)
        source = paths["train"]
    tok_path = resolve_model(tokenizer_spec(cfg), cfg)
    stats, speed = normalize_to_parts(cfg, source, tok_path, tmp)
    if stats["valid"] == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        if stats["rows"] == 0:
            raise IngestError(f"'{cfg.data.source}' has no rows at all (empty files?). Fix: "
                              "point data.source at files that hold data")
        top = sorted(stats["rejects"].items(), key=lambda kv: -kv[1])[:5]
        raise IngestError(f"'{cfg.data.source}' has no valid rows ({stats['rows']} read; "
                          f"reasons: {top}). Fix: check data.format and the field names")
    for reason, n in sorted(stats["rejects"].items()):
        log.warning("ingest: rejected %d rows: %s (see %s)", n, reason,
                    Path(cfg.run.output_dir) / "ingest" / "rejects")
    log.info("ingest: %d valid examples, %d rejected, %d truncated, %d tokens",
             stats["valid"], stats["rejected"], stats["truncated"], stats["tokens"])
    seconds = speed["seconds"]
    return {"source": cfg.data.source, "tokenizer": tok_path, **stats,
            "seconds_normalizing": seconds,
            "rows_per_s": stats["rows"] / seconds if seconds else None,
            "tokens_per_s": stats["tokens"] / seconds if seconds else None}
