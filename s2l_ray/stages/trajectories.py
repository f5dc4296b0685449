"""Stage `trajectories`: every example's loss under every reference checkpoint (the N x T matrix).

    ingest/examples -> + group = hash(id) % G -> hash shuffle by group -> map_batches(
        TrajectoryScorer actors, all T checkpoints on one device) -> write_parquet:
    trajectories/*.parquet (id, source, n_response_tokens, losses[T]) + manifest.json (the T
    checkpoints, in column order)

One pass: each batch crosses to the device once and goes through all T models. The math is in
`core.losses` (Ray-free). A group is one scoring window (rows sorted by (n_tokens, id), sliced
into batches of `batch_tokens` padded tokens), and an example's group depends on its id only: so
which rows share a batch never depends on the number of actors or blocks, and the losses are
bitwise the same whatever the parallelism (on the same hardware and software). The price is one
hash shuffle of the input. Checkpoints are checked on the driver before any Ray Data work; at the
end, per-block id digests and Parquet footers prove that no example was lost or duplicated.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from s2l_ray.config import S2LConfig
from s2l_ray.core.hashing import hash128
from s2l_ray.errors import S2LError
from s2l_ray.stages.base import read_report

log = logging.getLogger(__name__)
WINDOW_BATCHES = 16  # a group holds about this many batches: enough rows to sort by length
MIN_GROUPS = 16  # small data sets: at least this many groups (work units for the actors)
INPUT_COLUMNS = ["id", "source", "input_ids", "n_prompt_tokens", "n_tokens"]


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


def with_groups(batch: Any, groups: int) -> Any:
    """The batch (pyarrow) plus column `group`: a hash of the id, so it ignores the layout."""
    import pyarrow as pa

    keys = [hash128(i)[0] % groups for i in batch["id"].to_pylist()]
    return batch.append_column("group", pa.array(keys, pa.int64()))


def _add_group(batch: Any, groups: int, sink: Any) -> Any:
    """with_groups, reporting the block's id digest (the input side of the final check)."""
    import ray

    ray.get(sink.add.remote("input", id_digest(batch["id"].to_pylist())))
    return with_groups(batch, groups)


# ---------------------------------------------------------------------------------------------
# checkpoints


def load_checkpoint(path: str, trust_remote_code: bool = False) -> Any:
    """A reference checkpoint (float32, eval mode), or TrajectoryError naming it and the fix."""
    from s2l_ray.models.loading import load_causal_lm

    return load_causal_lm(
        path, trust_remote_code=trust_remote_code, error=TrajectoryError,
        fix="the reference checkpoints are damaged or incomplete; delete the train_ref folder "
            "and rerun `s2l train-ref` to recreate them")


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
    first = tokenizer_fingerprint(paths[0], trust_remote_code)
    for p in paths[1:]:
        if tokenizer_fingerprint(p, trust_remote_code) != first:
            raise TrajectoryError(
                f"checkpoint {p} has another tokenizer than {paths[0]}: their losses are over "
                "different token ids and cannot form one trajectory. Fix: save every checkpoint "
                "with the tokenizer the data was tokenized with, or retrain the reference")
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


class TrajectoryScorer:
    """Ray Data callable class: all T checkpoints on one device; scores whole groups per call."""

    def __init__(self, paths: list[str], batch_tokens: int, dtype: str, use_gpu: bool,
                 cpus: float, stats: Any, trust_remote_code: bool = False) -> None:
        import torch

        from s2l_ray.core.losses import autocast_dtype

        if not use_gpu:
            torch.set_num_threads(max(1, int(cpus)))
        self.device = torch.device("cuda" if use_gpu else "cpu")  # Ray sets CUDA_VISIBLE_DEVICES
        self.amp = autocast_dtype(dtype, use_gpu)
        self.models = [load_checkpoint(p, trust_remote_code).to(self.device) for p in paths]
        self.batch_tokens, self.stats = batch_tokens, stats

    def __call__(self, block: Any) -> Any:
        import numpy as np
        import pyarrow.compute as pc
        import ray

        from s2l_ray.core.losses import score_block

        out, stats = score_block(self.models, block, self.batch_tokens, self.device, self.amp)
        bad = int((~np.isfinite(pc.list_flatten(out["losses"]).to_numpy())).sum())
        ray.get(self.stats.add.remote("output", {**id_digest(out["id"].to_pylist()),
                                                 "nonfinite": bad, "pid": os.getpid(),
                                                 "stats": dataclasses.asdict(stats)}))
        return out


class _StatsSink:
    """Collects one digest per input block and per actor call (a few numbers each).

    Keyed by content, so a block that Ray retries after a failure is counted once.
    """

    def __init__(self) -> None:
        self.parts: dict[tuple[Any, ...], dict[str, Any]] = {}

    def add(self, side: str, part: dict[str, Any]) -> None:
        self.parts[(side, part["rows"], part["h1"], part["h2"])] = {"side": side, **part}

    def get(self) -> list[dict[str, Any]]:
        return list(self.parts.values())


# ---------------------------------------------------------------------------------------------
# checks and the stage


def verify_output(parts: list[dict[str, Any]], valid: int, out: Path) -> dict[str, Any]:
    """Rows read = rows scored = rows in the written files = ingest's valid count, and the same
    id multiset read and scored. Input ids are unique (ingest dedupes), so the output's are too.
    Works on per-block digests and Parquet footers: nothing is collected. Raises otherwise."""
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


def _score(cfg: S2LConfig, examples: Path, tmp: Path, paths: list[str], groups: int,
           use_gpu: bool, sink: Any) -> tuple[list[dict[str, Any]], float]:
    """The Ray Data pipeline: read, group, shuffle, score, write. Returns (digests, seconds)."""
    import ray
    import ray.data

    t, trust = cfg.trajectories, cfg.reference.trust_remote_code
    started = time.time()
    # A block that keeps failing fails the stage, never skipped (Ray Data's default, restated
    # in case something in this process raised it).
    ray.data.DataContext.get_current().max_errored_blocks = 0
    ds = ray.data.read_parquet(str(examples)).select_columns(INPUT_COLUMNS)
    ds = ds.map_batches(_add_group, batch_format="pyarrow",
                        fn_kwargs={"groups": groups, "sink": sink})
    ds = ds.repartition(groups, keys=["group"])  # a group's rows meet in one block
    ds = ds.map_batches(
        TrajectoryScorer, batch_size=None, batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=t.concurrency), num_cpus=t.cpus_per_actor,
        **({"num_gpus": 1} if use_gpu else {}),
        # No retry arguments: Ray Data already restarts pool actors lost with their node and
        # reruns their blocks (max_restarts=-1, max_task_retries=-1), and the ray_remote_args
        # that would set them are deprecated. tests/e2e/test_fault_tolerance.py guards this.
        fn_constructor_kwargs={"paths": paths, "batch_tokens": t.batch_tokens, "dtype": t.dtype,
                               "use_gpu": use_gpu, "cpus": t.cpus_per_actor, "stats": sink,
                               "trust_remote_code": trust})
    ds.write_parquet(str(tmp))
    wall = time.time() - started
    return ray.get(sink.get.remote()), wall


def _use_gpu(cfg: S2LConfig) -> bool:
    from s2l_ray.runtime import cluster_has_gpus

    t = cfg.trajectories
    return cluster_has_gpus() if t.use_gpu is None else t.use_gpu


def check(cfg: S2LConfig, inputs: dict[str, Path]) -> None:
    """Every checkpoint loads, shares the data's tokenizer and scores from its output head, and
    the actors leave CPU to read with: checked on the driver before any Ray Data work."""
    from s2l_ray.stages.train_ref import load_manifest

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

    from s2l_ray.core.losses import ScoreStats, autocast_dtype
    from s2l_ray.stages.train_ref import load_manifest

    t = cfg.trajectories
    rep = read_report(inputs["ingest"])
    manifest = load_manifest(inputs["train-ref"])
    paths = [m["path"] for m in manifest]
    use_gpu = _use_gpu(cfg)
    groups = n_groups(rep["valid"], rep["tokens"], t.batch_tokens)
    log.info("trajectories: %d examples x %d checkpoints, %d groups, %d %s actors",
             rep["valid"], len(paths), groups, t.concurrency, "GPU" if use_gpu else "CPU")
    # On the driver's node: its digests cannot be rebuilt, so it must not die with a worker node
    # (losing the driver's node ends the run anyway).
    sink = ray.remote(num_cpus=0)(_StatsSink).options(
        scheduling_strategy=NodeAffinitySchedulingStrategy(
            ray.get_runtime_context().get_node_id(), soft=False)).remote()
    try:
        parts, wall = _score(cfg, inputs["ingest"] / "examples", tmp, paths, groups, use_gpu, sink)
    finally:
        ray.kill(sink)
    stats = ScoreStats(seconds_per_checkpoint=[0.0] * len(paths))
    for part in parts:
        if part["side"] == "output":
            stats.add(ScoreStats(**part["stats"]))
    checked = verify_output(parts, rep["valid"], tmp)
    (tmp / "manifest.json").write_text(json.dumps(
        [{**m, "column": i} for i, m in enumerate(manifest)], indent=2) + "\n")
    n, pad_eff = checked["rows"], stats.tokens / max(1, stats.padded_tokens)
    log.info("trajectories: %d examples, %.1f examples/s, %.0f tokens/s, padding efficiency %.2f",
             n, n / wall, stats.tokens / wall, pad_eff)
    return {
        "examples": n, "checkpoints": len(paths), "tokens": stats.tokens,
        "response_tokens": stats.response_tokens, "padded_tokens": stats.padded_tokens,
        "padding_efficiency": pad_eff, "scoring_seconds": wall, "examples_per_s": n / wall,
        "tokens_per_s": stats.tokens / wall, "seconds_per_checkpoint": stats.seconds_per_checkpoint,
        "batches": stats.batches, "groups": groups, "actors": t.concurrency,
        "blocks_read": sum(p["side"] == "input" for p in parts),
        "actors_used": len({p["pid"] for p in parts if p["side"] == "output" and p["rows"]}),
        "device": "GPU" if use_gpu else "CPU",
        "compute_dtype": "fp32" if autocast_dtype(t.dtype, use_gpu) is None else "bf16",
        "nonfinite_losses": checked["nonfinite_losses"]}
