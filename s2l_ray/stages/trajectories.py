"""Stage `trajectories`: every example's loss under every reference checkpoint (the N x T matrix).

    driver: ingest/examples/*.parquet footers -> G groups, each a contiguous range of rows (by
        position over the parts in sorted order) -> one work unit per group still to score
    Ray Data: units -> map_batches(TrajectoryScorer actors: read the group's rows (pyarrow,
        its file slices), all T checkpoints on one device, write the group's file) ->
        trajectories/group-GGGGG-of-NNNNN.parquet (id, source, n_response_tokens, losses[T])
        + manifest.json (the T checkpoints, in column order)

One pass: each batch crosses to the device once and goes through all T models. The math is in
`core.losses` (Ray-free). A group is one scoring window (rows sorted by (n_tokens, id), sliced
into batches of `batch_tokens` padded tokens), and an example's group depends on its position in
ingest's output only (deterministic: row for row the same for the same input): so which rows
share a batch never depends on the number of actors, blocks or nodes, and the losses are
bitwise the same whatever the parallelism (on the same hardware and software). The groups are
planned from Parquet footers (row counts), so no data moves before scoring: the actors read
their rows themselves, and the first group is scored as soon as an actor is up (an earlier
version hash-shuffled the examples by group, an all-to-all barrier that held back all scoring).
Checkpoints are checked on the driver before any Ray Data work; at the end, an id digest of
ingest's output (read on the driver, apart from the plan) against the group files' digests and
footers proves that no example was lost or duplicated.

Resume: each group's file is published atomically (written as a hidden .part, then renamed)
with its id digest in its metadata. A rerun after a kill (driver or whole cluster lost) keeps
the work folder, checks every group file there (`check_group`: it decodes, and its rows match
its metadata, its group's planned row count, and the resume key: checkpoints, grouping scheme
and ingest's parts), deletes the rest, and scores only the missing groups; the exactly-once
check then covers all of them. A group's losses depend on its rows only, so the result is the
same (bitwise on the same hardware) as an uninterrupted run's.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from concurrent.futures import ThreadPoolExecutor
from itertools import pairwise
from pathlib import Path
from typing import Any

from s2l_ray.config import S2LConfig
from s2l_ray.core.hashing import hash128
from s2l_ray.errors import S2LError
from s2l_ray.stages.base import read_report

log = logging.getLogger(__name__)
WINDOW_BATCHES = 16  # a group holds about this many batches: enough rows to sort by length
ACTOR_START_TIMEOUT_S = 900  # an autoscaler may need minutes to add GPU nodes
MIN_GROUPS = 16  # small data sets: at least this many groups (work units for the actors)
INPUT_COLUMNS = ["id", "source", "input_ids", "n_prompt_tokens", "n_tokens"]
# Part of the resume key: group files made under another grouping (the earlier hash(id) % G
# groups) hold other rows, and are never reused.
GROUPING = "position-v1"


class TrajectoryError(S2LError):
    """The checkpoints cannot be scored, or the output does not match the input."""


def n_groups(valid: int, tokens: int, batch_tokens: int) -> int:
    """Groups (scoring windows): about WINDOW_BATCHES batches of rows each, but at least
    MIN_GROUPS while each still fills a batch, so small data sets keep several actors busy.
    From the data and batch_tokens only: never from the cluster, or results would vary with it."""
    from s2l_ray.core.losses import padded

    per_batch = max(1, batch_tokens // padded(max(1, round(tokens / valid))))
    return max(1, -(-valid // (WINDOW_BATCHES * per_batch)),
               min(MIN_GROUPS, -(-valid // per_batch)))


def id_digest(ids: list[str]) -> dict[str, int]:
    """Row count and two sums of 64-bit id hashes: equal digests mean the same id multiset."""
    h1 = h2 = 0
    for i in ids:
        a, b = hash128(i)
        h1, h2 = (h1 + a) % 2**64, (h2 + b) % 2**64
    return {"rows": len(ids), "h1": h1, "h2": h2}


def group_starts(rows: int, groups: int) -> list[int]:
    """First global row of each group, plus `rows` at the end: group g is rows
    [starts[g], starts[g + 1]). Balanced (sizes differ by one at most) rather than a fixed size
    with a short last group, which would leave trailing groups empty whenever ceil(rows / G)
    rows per group reach the end early (e.g. 100 rows, 16 groups of 7). At most `rows` groups,
    so none is empty."""
    groups = max(1, min(groups, rows))
    return [g * rows // groups for g in range(groups + 1)]


def plan_groups(files: list[str], counts: list[int], groups: int
                ) -> list[list[tuple[str, int, int]]]:
    """Each group's file slices [(file, first row in the file, rows)], from the files' row
    counts (their Parquet footers) in the given (sorted) order: group g holds the global rows
    [starts[g], starts[g + 1]) of `group_starts`, across file boundaries where it must. Empty
    files are skipped; no rows, no groups."""
    if len(files) != len(counts):
        raise ValueError(f"{len(files)} files but {len(counts)} row counts")
    total = sum(counts)
    if not total:
        return []
    starts = group_starts(total, groups)
    plan: list[list[tuple[str, int, int]]] = []
    f, first = 0, 0  # the file holding the next row, and its first global row
    for lo, hi in pairwise(starts):
        slices = []
        while lo < hi:
            while first + counts[f] <= lo:  # skip files wholly before this row (or empty)
                first += counts[f]
                f += 1
            take = min(hi, first + counts[f]) - lo
            slices.append((files[f], lo - first, take))
            lo += take
        plan.append(slices)
    return plan


def with_groups(table: Any, groups: int) -> Any:
    """The table (pyarrow, rows in global order: ingest's parts in sorted order) plus column
    `group`: the stage's position groups, for scoring every group in one process
    (`score_block`) as the stage does (benchmarks, tests)."""
    import numpy as np
    import pyarrow as pa

    starts = group_starts(table.num_rows, groups)
    keys = np.searchsorted(np.asarray(starts[1:]), np.arange(table.num_rows), side="right")
    return table.append_column("group", pa.array(keys, pa.int64()))


def read_slices(slices: list[tuple[str, int, int]], columns: list[str]) -> Any:
    """A group's rows (pyarrow): each file's slice, reading only the row groups it overlaps and
    the given columns. Raises ValueError if a file holds fewer rows than planned (it changed)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    parts = []
    for path, offset, rows in slices:
        pf = pq.ParquetFile(path)
        wanted, start, first = [], 0, None
        for i in range(pf.metadata.num_row_groups):
            n = pf.metadata.row_group(i).num_rows
            if start < offset + rows and start + n > offset:
                wanted.append(i)
                first = start if first is None else first
            start += n
        got = pf.read_row_groups(wanted, columns=columns).slice(offset - (first or 0), rows)
        if got.num_rows != rows:
            raise ValueError(f"{path}: {got.num_rows} rows from row {offset}, {rows} planned; "
                             "the examples changed during the stage")
        parts.append(got)
    return pa.concat_tables(parts)


def examples_plan(examples: Path, groups: int, valid: int
                  ) -> tuple[list[list[tuple[str, int, int]]], str]:
    """(the groups' file slices, the plan's key) for ingest's examples folder, from footers
    only. The key names the grouping scheme and every part (name, rows, bytes): a group file
    is reused only under the same plan. Raises TrajectoryError if the parts do not hold
    ingest's `valid` rows."""
    import pyarrow.parquet as pq

    from s2l_ray.io.parquet import parquet_files

    files = parquet_files(examples, "ingest")
    counts = [pq.read_metadata(f).num_rows for f in files]
    if sum(counts) != valid:
        raise TrajectoryError(f"ingest's report counts {valid} valid examples, but {examples} "
                              f"holds {sum(counts)} rows. Fix: delete the ingest folder and "
                              "rerun `s2l ingest`")
    plan = plan_groups(files, counts, groups)
    h = hashlib.sha256(f"{GROUPING} {len(plan)}\0".encode())
    for f, n in zip(files, counts):
        h.update(f"{Path(f).name}:{n}:{Path(f).stat().st_size}\0".encode())
    return plan, h.hexdigest()[:16]


def input_digests(examples: Path) -> list[dict[str, Any]]:
    """Id digest of every part of ingest's output, read on the driver apart from the plan (the
    input side of the exactly-once check): a slicing error that read a row twice, or none, in
    the actors cannot also be in it. One part at a time: only its id column is held."""
    import pyarrow.parquet as pq

    from s2l_ray.io.parquet import parquet_files

    return [{"side": "input", **id_digest(pq.read_table(f, columns=["id"])["id"].to_pylist())}
            for f in parquet_files(examples, "ingest")]


# ---------------------------------------------------------------------------------------------
# group files: the unit of output and of resume

GROUP_FILE = re.compile(r"group-(\d{5,})-of-(\d{5,})\.parquet")
GROUP_META = b"s2l_group"  # Parquet schema metadata key: what the file claims to hold


def group_file(group: int, groups: int) -> str:
    return f"group-{group:05d}-of-{groups:05d}.parquet"


def checkpoints_key(paths: list[str]) -> str:
    """Identity of the checkpoints scored with, in column order: each one's files (relative
    name, size, mtime), not its folder's path, so a run folder moved or copied whole (mtimes
    kept) still matches. A group file scored with other weights under the same config is not
    reused."""
    h = hashlib.sha256()
    for i, p in enumerate(paths):
        h.update(f"checkpoint {i}\0".encode())
        root = Path(p)
        for f in sorted(root.rglob("*")) if root.is_dir() else []:
            if f.is_file():
                st = f.stat()
                h.update(f"{f.relative_to(root)}:{st.st_size}:{st.st_mtime_ns}\0".encode())
    return h.hexdigest()[:16]


def _nonfinite(table: Any) -> int:
    import numpy as np
    import pyarrow.compute as pc

    return int((~np.isfinite(pc.list_flatten(table["losses"]).to_numpy())).sum())


def write_group(folder: Path, group: int, groups: int, table: Any, key: str,
                stats: Any) -> dict[str, Any]:
    """Publish one group's scored rows as `group-G-of-N.parquet`, atomically (written under a
    hidden .part name, then renamed): the file is either whole or absent. Its schema metadata
    records what it holds (id digest, counts, checkpoints key), for checking before reuse.
    Deterministic content only (no timings), so a rescored group gives the same bytes."""
    import pyarrow.parquet as pq

    meta = {"group": group, "groups": groups, "key": key, **id_digest(table["id"].to_pylist()),
            "nonfinite": _nonfinite(table), "tokens": stats.tokens,
            "response_tokens": stats.response_tokens, "padded_tokens": stats.padded_tokens,
            "batches": stats.batches}
    table = table.replace_schema_metadata({GROUP_META: json.dumps(meta).encode()})
    name = group_file(group, groups)
    part = folder / f".{name}.part"
    pq.write_table(table, str(part))
    os.replace(part, folder / name)
    return meta


def check_group(path: Path, sizes: list[int], key: str) -> dict[str, Any]:
    """The metadata of a complete, trustworthy group file, or ValueError saying why not.
    `sizes`: rows per group of this run's plan; `key`: the resume key (checkpoints, grouping
    scheme and ingest's parts, so the same plan means the same rows in each group).

    The whole file is read (a truncated or damaged file fails to decode), and its rows must
    match its metadata: same row count and id digest, the group's planned row count, the same
    group count and key, the same count of non-finite losses."""
    import pyarrow.parquet as pq

    groups = len(sizes)
    m = GROUP_FILE.fullmatch(path.name)
    if not m or int(m.group(2)) != groups or int(m.group(1)) >= groups:
        raise ValueError(f"not a group file of this run ({groups} groups)")
    group = int(m.group(1))
    try:
        table = pq.read_table(str(path))
        meta = json.loads((table.schema.metadata or {}).get(GROUP_META, b"null"))
    except Exception as e:  # pyarrow raises several types for damaged files
        raise ValueError(f"unreadable ({type(e).__name__}: {str(e)[:200]})") from e
    if not isinstance(meta, dict):
        raise ValueError("no group metadata")
    if (meta.get("group"), meta.get("groups"), meta.get("key")) != (group, groups, key):
        raise ValueError("made for another group, group count, checkpoints or examples")
    got = id_digest(table["id"].to_pylist())
    if any(meta.get(k) != got[k] for k in ("rows", "h1", "h2")):
        raise ValueError("its rows do not match its metadata")
    if got["rows"] != sizes[group]:
        raise ValueError(f"holds {got['rows']} rows, its group has {sizes[group]}")
    if _nonfinite(table) != meta.get("nonfinite"):
        raise ValueError("its losses do not match its metadata")
    return meta


def reusable_groups(folder: Path, sizes: list[int], key: str) -> dict[int, dict[str, Any]]:
    """Group files a killed run left complete in `folder`: {group: metadata}. Everything else
    (half-written .part files, damaged or foreign files) is deleted, so it is scored again."""
    found: dict[int, dict[str, Any]] = {}
    for f in sorted(folder.iterdir()):
        if f.name.endswith(".part"):
            f.unlink()
        elif f.suffix == ".parquet":
            try:
                meta = check_group(f, sizes, key)
            except ValueError as e:
                log.warning("trajectories: scoring %s again: %s", f.name, e)
                f.unlink()
                continue
            found[meta["group"]] = meta
    return found


# ---------------------------------------------------------------------------------------------
# checkpoints


def load_checkpoint(path: str, trust_remote_code: bool = False) -> Any:
    """A reference checkpoint (float32, eval mode), or TrajectoryError naming it and the fix."""
    from s2l_ray.models.loading import load_causal_lm

    return load_causal_lm(
        path, trust_remote_code=trust_remote_code, error=TrajectoryError,
        fix="the reference checkpoints are damaged or incomplete; delete the train_ref folder "
            "and rerun `s2l train-ref` to recreate them")


def load_scoring_models(paths: list[str], dtype: str, device: Any,
                        trust_remote_code: bool = False) -> tuple[list[Any], Any]:
    """(the T checkpoints on `device`, the autocast dtype or None) under trajectories.dtype
    (`core.losses.scoring_dtype`: 'auto' is bf16 weights on GPU, float32 on CPU)."""
    from s2l_ray.core.losses import autocast_dtype, scoring_dtype, weights_dtype

    on_gpu = device.type == "cuda"
    dtype = scoring_dtype(dtype, on_gpu)
    models = [load_checkpoint(p, trust_remote_code).to(device, weights_dtype(dtype))
              for p in paths]
    return models, autocast_dtype(dtype, on_gpu)


def tokenizer_fingerprint(path: str, trust_remote_code: bool = False) -> str:
    """Hash of vocabulary, merges and special tokens: equal means the same token ids."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except Exception as e:
        raise TrajectoryError(f"the tokenizer in {path} does not load ({e}). Fix: save the "
                              "tokenizer next to the weights (tokenizer.save_pretrained)") from e
    blob: dict[str, Any] = {"vocab": sorted(tok.get_vocab().items()),
                            "special": [tok.eos_token_id, tok.bos_token_id, tok.pad_token_id]}
    tj = Path(path) / "tokenizer.json"
    if tj.is_file():
        model = json.loads(tj.read_text(encoding="utf-8")).get("model", {})
        blob["model"] = [model.get("type"), model.get("merges")]
    return hashlib.sha256(json.dumps(blob, default=str).encode()).hexdigest()


def check_checkpoints(paths: list[str], data_tokenizer: str | None,
                      trust_remote_code: bool = False) -> None:
    """Load every checkpoint once on the driver; fail before the pipeline starts, naming it."""
    from s2l_ray.core.losses import head_path_check

    if not paths:
        raise TrajectoryError("the train_ref manifest lists no checkpoint. Fix: delete the "
                              "train_ref folder and rerun `s2l train-ref`")
    first = same_tokenizer(paths, trust_remote_code, "save every checkpoint with the tokenizer "
                           "the data was tokenized with, or retrain the reference")
    if data_tokenizer:
        try:
            same = tokenizer_fingerprint(data_tokenizer, trust_remote_code) == first
        except TrajectoryError as e:
            log.warning("trajectories: cannot compare with the data's tokenizer: %s", e)
            same = True
        if not same:
            raise TrajectoryError(
                f"the examples were tokenized with {data_tokenizer}, but checkpoint {paths[0]} "
                "has another tokenizer. Fix: set data.tokenizer to the reference model's "
                "tokenizer (or null) and rerun ingest and train-ref in a new run.output_dir")
    for i, p in enumerate(paths):
        model = load_checkpoint(p, trust_remote_code)
        ours, hf = head_path_check(model) if i == 0 else (0.0, 0.0)
        if not abs(ours - hf) <= 1e-3 * max(1.0, abs(hf)):
            raise TrajectoryError(
                f"checkpoint {p}: {type(model).__name__} post-processes its logits (loss "
                f"{ours:.5f} from the output head, {hf:.5f} from the model). Fix: use a "
                "reference whose logits are lm_head(last hidden state), e.g. Pythia or Llama")


# ---------------------------------------------------------------------------------------------
# the actor


def same_tokenizer(paths: list[str], trust_remote_code: bool, fix: str) -> str:
    """Every checkpoint has the first one's tokenizer (no model loaded); returns its
    fingerprint. `fix` ends the error, as the caller knows where the checkpoints came from."""
    first = tokenizer_fingerprint(paths[0], trust_remote_code)
    for p in paths[1:]:
        if tokenizer_fingerprint(p, trust_remote_code) != first:
            raise TrajectoryError(
                f"checkpoint {p} has another tokenizer than {paths[0]}: their losses are over "
                f"different token ids and cannot form one trajectory. Fix: {fix}")
    return first


class TrajectoryScorer:
    """Ray Data callable class: all T checkpoints on one device. Each input row is a work unit
    (`group`, and `slices`: its file slices as JSON); the actor reads the group's rows itself,
    scores the group whole and publishes its file (`write_group`). Returns one small summary row
    per group (its metadata as JSON): only those reach the driver."""

    def __init__(self, paths: list[str], batch_tokens: int, dtype: str, use_gpu: bool,
                 cpus: float, out_dir: str, groups: int, key: str, sink: Any,
                 trust_remote_code: bool = False, scorer: str = "padded",
                 compile_mode: str = "off") -> None:
        import ray
        import torch

        if not use_gpu:
            torch.set_num_threads(max(1, int(cpus)))
        self.device = torch.device("cuda" if use_gpu else "cpu")  # Ray sets CUDA_VISIBLE_DEVICES
        self.models, self.amp = load_scoring_models(paths, dtype, self.device, trust_remote_code)
        self.batch_tokens = batch_tokens
        self.out_dir, self.groups, self.key = Path(out_dir), groups, key
        self.scorer = make_scorer(scorer, self.models, self.device, batch_tokens, self.amp,
                                  compile_mode)
        # On a GPU: the CUDA context, cuBLAS and the fused cross-entropy's compilation are paid
        # here, at the actor's start, not inside the first group's time (on CPU: milliseconds).
        self._warm_up()
        ray.get(sink.actor_ready.remote(os.getpid()))  # counted in the report

    def _warm_up(self) -> None:
        """Score two synthetic rows once; the result is dropped."""
        import pyarrow as pa

        from s2l_ray.core.losses import score_block

        rows = pa.table({"id": ["warm-up-0", "warm-up-1"], "source": pa.nulls(2, pa.string()),
                         "input_ids": pa.array([list(range(1, 9))] * 2, pa.list_(pa.int32())),
                         "n_prompt_tokens": pa.array([2, 3], pa.int32()),
                         "n_tokens": pa.array([8, 8], pa.int32()),
                         "group": pa.array([0, 0], pa.int64())})
        score_block(self.models, rows, self.batch_tokens, self.device, self.amp, self.scorer)

    def __call__(self, units: Any) -> Any:
        import pyarrow as pa

        from s2l_ray.core.losses import score_block

        summaries = []
        for g, slices in zip(units["group"].to_pylist(), units["slices"].to_pylist()):
            slices = [tuple(s) for s in json.loads(slices)]
            rows = read_slices(slices, INPUT_COLUMNS)
            # One group per score_block call: its own window (score_block windows by `group`).
            rows = rows.append_column("group", pa.array([g] * rows.num_rows, pa.int64()))
            out, stats = score_block(self.models, rows, self.batch_tokens, self.device,
                                     self.amp, self.scorer)
            meta = write_group(self.out_dir, g, self.groups, out, self.key, stats)
            summaries.append(json.dumps({**meta, "pid": os.getpid(), "slices": len(slices),
                                         "seconds_per_checkpoint": stats.seconds_per_checkpoint}))
        return pa.table({"summary": pa.array(summaries, pa.string())})


def make_scorer(kind: str, models: list[Any], device: Any, batch_tokens: int, amp: Any,
                compile_mode: str = "off") -> Any:
    """None (score_block's padded default) or the packed scorer's `score_sorted`. A compiled
    scorer takes any batch length (dynamic shapes; padding every batch to one shape measured
    slower than eager on an H200), except under 'reduce-overhead', whose CUDA graphs need one
    shape."""
    if kind == "padded":
        return None
    from s2l_ray.core.packed_loss import PackedScorer, auto_attention

    return PackedScorer(models, device, batch_tokens, attention=auto_attention(device),
                        amp_dtype=amp, compile_mode=None if compile_mode == "off" else
                        compile_mode, dynamic=compile_mode != "reduce-overhead").score_sorted


class _ActorCount:
    """Counts the scorer actors that loaded their checkpoints (a restarted actor counts again),
    for the report: the scored groups' summaries come back through Ray Data itself."""

    def __init__(self) -> None:
        self.actors: set[int] = set()  # pids

    def actor_ready(self, pid: int) -> None:
        self.actors.add(pid)

    def actors_ready(self) -> int:
        return len(self.actors)


# ---------------------------------------------------------------------------------------------
# checks and the stage


def verify_output(parts: list[dict[str, Any]], valid: int, out: Path) -> dict[str, Any]:
    """Rows read = rows scored = rows in the written files = ingest's valid count, and the same
    id multiset read and scored. Input ids are unique (ingest dedupes), so the output's are too.
    Works on per-part and per-group digests and Parquet footers: nothing is collected. Raises
    otherwise."""
    import pyarrow.parquet as pq

    tot = {s: {"rows": 0, "h1": 0, "h2": 0, "nonfinite": 0} for s in ("input", "output")}
    for p in parts:
        t = tot[p["side"]]
        t["rows"] += p["rows"]
        t["nonfinite"] += p.get("nonfinite", 0)
        t["h1"], t["h2"] = (t["h1"] + p["h1"]) % 2**64, (t["h2"] + p["h2"]) % 2**64
    n_in, n_out = tot["input"]["rows"], tot["output"]["rows"]
    on_disk = sum(pq.read_metadata(f).num_rows for f in out.glob("*.parquet"))
    if not n_in == n_out == on_disk == valid:
        raise TrajectoryError(f"ingest has {valid} valid examples, but {n_in} were read, "
                              f"{n_out} scored and {on_disk} written: examples were lost or "
                              f"duplicated. The partial output is left in {out}. Fix: rerun the "
                              "stage; report a bug if it repeats")
    if (tot["input"]["h1"], tot["input"]["h2"]) != (tot["output"]["h1"], tot["output"]["h2"]):
        raise TrajectoryError(f"the ids scored differ from the ids read (same count, other ids):"
                              f" an example was duplicated and another lost. The output is left "
                              f"in {out}. Fix: rerun the stage; report a bug if it repeats")
    if tot["output"]["nonfinite"]:
        log.warning("trajectories: %d losses are not finite (NaN/inf)", tot["output"]["nonfinite"])
    return {"rows": n_out, "nonfinite_losses": tot["output"]["nonfinite"]}


def _score(cfg: S2LConfig, tmp: Path, paths: list[str], plan: list[list[tuple[str, int, int]]],
           done: dict[int, dict[str, Any]], key: str, use_gpu: bool, sink: Any,
           total: int) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The Ray Data pipeline: one work unit per group of `plan` not in `done`, streamed through
    the scorer actors (each reads, scores and writes its groups). Returns (one summary per
    group scored, progress figures)."""
    import ray
    import ray.data

    from s2l_ray.stages.progress import stage_progress

    t, trust = cfg.trajectories, cfg.reference.trust_remote_code
    # A unit that keeps failing fails the stage, never skipped (Ray Data's default, restated
    # in case something in this process raised it).
    ctx = ray.data.DataContext.get_current()
    ctx.max_errored_blocks = 0
    # Start scoring only once every actor has loaded its T checkpoints: otherwise the first
    # actor up takes the units while the others are still loading.
    ctx.wait_for_min_actors_s = ACTOR_START_TIMEOUT_S
    units = [{"group": g, "slices": json.dumps(s)} for g, s in enumerate(plan) if g not in done]
    # One block per unit, so each is its own actor task, handed to whichever actor is free.
    ds = ray.data.from_items(units, override_num_blocks=max(1, len(units)))
    ds = ds.map_batches(
        TrajectoryScorer, batch_size=1, batch_format="pyarrow",
        # One group per actor at a time: queueing several on the first actor up would leave
        # the others idle when there are few groups. (Two in flight would only prefetch the
        # tiny unit row, not the group's read, which runs inside the call.)
        compute=ray.data.ActorPoolStrategy(size=t.concurrency, max_tasks_in_flight_per_actor=1),
        num_cpus=t.cpus_per_actor,
        **({"num_gpus": 1} if use_gpu else {}),
        # No retry arguments: Ray Data already restarts pool actors lost with their node and
        # reruns their units (max_restarts=-1, max_task_retries=-1), and the ray_remote_args
        # that would set them are deprecated. tests/e2e/test_fault_tolerance.py guards this.
        fn_constructor_kwargs={"paths": paths, "batch_tokens": t.tokens_per_batch(use_gpu),
                               "dtype": t.dtype,
                               "use_gpu": use_gpu, "cpus": t.cpus_per_actor, "out_dir": str(tmp),
                               "groups": len(plan), "key": key, "sink": sink,
                               "trust_remote_code": trust,
                               "scorer": t.scorer, "compile_mode": t.compile})
    scored: list[dict[str, Any]] = []
    # Summaries stream back as groups finish: the progress count, at no extra cost.
    with stage_progress(cfg, "trajectories", total, rate_unit="ex/s") as progress:
        try:
            if units:  # all reused: no actor to start
                for row in ds.iter_rows():
                    scored.append(json.loads(row["summary"]))
                    progress.add(scored[-1]["rows"])
        except ray.exceptions.GetTimeoutError as e:
            raise TrajectoryError(
                f"the {t.concurrency} scoring actors did not all start within "
                f"{ACTOR_START_TIMEOUT_S} s ({e}). Fix: lower trajectories.concurrency to what "
                "the cluster has room for (each actor takes trajectories.cpus_per_actor CPUs, "
                "and one GPU on GPU runs), or add nodes.") from e
    return scored, progress.stop()


def digests(scored: list[dict[str, Any]], reused: dict[int, dict[str, Any]],
            inputs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The parts verify_output checks: the input digests, and one output digest per group file
    (scored now or reused). A group reported twice with the same rows (a unit Ray reran; its
    file was replaced by the same bytes) counts once; with other rows, twice, and fails."""
    parts, seen = list(inputs), set()
    for m in [*reused.values(), *scored]:
        k = (m["group"], m["rows"], m["h1"], m["h2"])
        if k not in seen:
            seen.add(k)
            parts.append({"side": "output", **m})
    return parts


def _resume_report(groups: int, reused: dict[int, dict[str, Any]],
                   scored: list[dict[str, Any]]) -> dict[str, Any]:
    return {"groups": groups, "groups_reused": len(reused),
            "groups_scored": len({m["group"] for m in scored}),
            "examples_reused": sum(m["rows"] for m in reused.values()),
            "examples_scored": sum(m["rows"] for m in scored)}


def _use_gpu(cfg: S2LConfig) -> bool:
    from s2l_ray.runtime import cluster_has_gpus

    t = cfg.trajectories
    return cluster_has_gpus() if t.use_gpu is None else t.use_gpu


def check(cfg: S2LConfig, inputs: dict[str, Path]) -> None:
    """Every checkpoint loads, shares the data's tokenizer and scores from its output head, and
    the actors leave CPU to read with: checked on the driver before any Ray Data work."""
    from s2l_ray.stages.train_ref import load_manifest

    if cfg.trajectories.source:  # ready-made: checked when read (stages.given)
        return
    paths = [m["path"] for m in load_manifest(inputs["train-ref"])]
    rep = read_report(inputs["ingest"])
    check_checkpoints(paths, rep.get("tokenizer"), cfg.reference.trust_remote_code)
    if not _use_gpu(cfg):
        from s2l_ray.runtime import check_cpu_headroom

        t = cfg.trajectories
        check_cpu_headroom(t.concurrency, t.cpus_per_actor, "trajectories.cpus_per_actor",
                           "trajectories.concurrency", "CPU scoring actors")


def run(cfg: S2LConfig, inputs: dict[str, Path], tmp: Path) -> dict[str, Any]:
    """Score every example under every reference checkpoint into `tmp`; returns the report."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from s2l_ray.core.losses import ScoreStats, compute_dtype_name, scoring_dtype
    from s2l_ray.stages.given import import_trajectories
    from s2l_ray.stages.train_ref import load_manifest

    if cfg.trajectories.source:  # ready-made trajectories: checked and published, not scored
        return import_trajectories(cfg.trajectories.source, inputs["ingest"] / "examples", tmp)
    t = cfg.trajectories
    rep = read_report(inputs["ingest"])
    manifest = load_manifest(inputs["train-ref"])
    paths = [m["path"] for m in manifest]
    use_gpu = _use_gpu(cfg)
    examples = inputs["ingest"] / "examples"
    plan, plan_key = examples_plan(
        examples, n_groups(rep["valid"], rep["tokens"], t.tokens_per_batch(use_gpu)),
        rep["valid"])
    groups = len(plan)
    # The resume key: the checkpoints and the plan (grouping scheme, ingest's parts).
    key = hashlib.sha256(f"{checkpoints_key(paths)} {plan_key}".encode()).hexdigest()[:16]
    reused = reusable_groups(tmp, [sum(n for *_, n in g) for g in plan], key)  # kept from a kill
    log.info("trajectories: %d examples x %d checkpoints, %d groups (%d done by an earlier run),"
             " %d %s actors", rep["valid"], len(paths), groups, len(reused), t.concurrency,
             "GPU" if use_gpu else "CPU")
    # On the driver's node: it must not die with a worker node while the actors report to it
    # (losing the driver's node ends the run anyway).
    sink = ray.remote(num_cpus=0)(_ActorCount).options(
        scheduling_strategy=NodeAffinitySchedulingStrategy(
            ray.get_runtime_context().get_node_id(), soft=False)).remote()
    todo = rep["valid"] - sum(m["rows"] for m in reused.values())
    try:
        # The input side of the exactly-once check, read while the actors score.
        with ThreadPoolExecutor(1) as pool:
            read = pool.submit(input_digests, examples)
            scored, progress = _score(cfg, tmp, paths, plan, reused, key, use_gpu, sink, todo)
            parts = digests(scored, reused, read.result())
        started = ray.get(sink.actors_ready.remote())
    finally:
        ray.kill(sink)
    wall = progress["seconds"]
    stats = ScoreStats(seconds_per_checkpoint=[0.0] * len(paths))
    for m in [*reused.values(), *scored]:
        stats.add(ScoreStats(tokens=m["tokens"], response_tokens=m["response_tokens"],
                             padded_tokens=m["padded_tokens"], batches=m["batches"],
                             seconds_per_checkpoint=m.get("seconds_per_checkpoint")
                             or [0.0] * len(paths)))
    checked = verify_output(parts, rep["valid"], tmp)
    (tmp / "manifest.json").write_text(json.dumps(
        [{**m, "column": i} for i, m in enumerate(manifest)], indent=2) + "\n")
    n, pad_eff = checked["rows"], stats.tokens / max(1, stats.padded_tokens)
    resume = _resume_report(groups, reused, scored)
    done_now = resume["examples_scored"]
    scored_tokens = sum(m["tokens"] for m in scored)
    log.info("trajectories: %d examples (%d scored now, %d groups of %d reused), %.1f "
             "examples/s, %.0f tokens/s, padding efficiency %.2f", n, done_now,
             resume["groups_reused"], groups, done_now / wall if wall else 0.0,
             scored_tokens / wall if wall else 0.0, pad_eff)
    return {
        "examples": n, "checkpoints": len(paths), "tokens": stats.tokens,
        "response_tokens": stats.response_tokens, "padded_tokens": stats.padded_tokens,
        "padding_efficiency": pad_eff, "scoring_seconds": wall,
        # rates of this run's scoring: examples and tokens it scored (not those reused)
        "examples_per_s": done_now / wall if wall else None,
        "tokens_per_s": scored_tokens / wall if wall else None,
        "seconds_per_checkpoint": stats.seconds_per_checkpoint,
        "batches": stats.batches, **resume, "actors": t.concurrency,
        # ingest's part files, and the file slices this run's actors read (a group across a
        # part boundary reads two)
        "parts": sum(p["side"] == "input" for p in parts),
        "slices_read": sum(m["slices"] for m in scored),
        # actor processes that loaded the checkpoints (a restarted actor counts again), and
        # those that scored a group: Ray Data hands each unit to the least busy actor, so
        # when groups score faster than an actor takes its next, one actor may do several.
        "actors_started": started,
        "actors_used": len({m["pid"] for m in scored if m["rows"]}),
        "device": "GPU" if use_gpu else "CPU",
        "compute_dtype": compute_dtype_name(scoring_dtype(t.dtype, use_gpu), use_gpu),
        "nonfinite_losses": checked["nonfinite_losses"]}
