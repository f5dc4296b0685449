"""Benchmark: Ray Data overhead of the trajectory stage, against the bare scorer, same data.

  stage: the stage's Ray Data pipeline (`stages.trajectories._score`): one work unit per
         position group (planned from the Parquet footers), each read, scored and written by a
         TrajectoryScorer actor (one per GPU, or one CPU actor). Timed from the call to the
         written files, with Ray already started (a run starts it once for every stage); the
         actor's start and model loading count, as they do in a run.
  bare:  the same scorer (`trajectories.scorer`) called in this process on the same rows, with
         the same groups (`with_groups` + `score_block` per group), models already loaded.

Goal: bare / stage >= 0.8. Random-weight Pythia-shaped checkpoint saved once, used T times;
random token ids with the benchmark's log-normal lengths.

    python benchmarks/ray_overhead.py --device cuda          # 20000 examples, pythia-70m, T=4
    python benchmarks/ray_overhead.py --device cpu --examples 64 --model tiny
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
log = logging.getLogger("ray_overhead")


def write_inputs(folder: Path, n: int, model: str, max_len: int, seed: int) -> tuple[Path, str]:
    """examples/part-0.parquet (the ingest columns) and one saved checkpoint; returns paths."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch
    from trajectory_throughput import SHAPES, VOCAB, make_data
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    if model == "tiny":
        hidden, layers, heads, vocab = 64, 2, 4, 512
    else:
        (hidden, layers, heads), vocab = SHAPES[model], VOCAB
    rows, n_prompt = make_data(n, 16, max_len, seed)
    rows = [r % vocab for r in rows]
    ex = folder / "examples"
    ex.mkdir(parents=True)
    for part in range(4):  # several files: Ray Data reads them as several blocks
        sl = slice(part * n // 4, (part + 1) * n // 4)
        pq.write_table(pa.table({
            "id": [f"ex{i:08d}" for i in range(n)][sl],
            "source": ["bench"] * len(rows[sl]),
            "input_ids": pa.array([r.astype(np.int32) for r in rows[sl]], pa.list_(pa.int32())),
            "n_prompt_tokens": pa.array(n_prompt[sl], pa.int32()),
            "n_tokens": pa.array([len(r) for r in rows[sl]], pa.int32())}),
            ex / f"part-{part}.parquet")
    torch.manual_seed(0)
    cfg = GPTNeoXConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers,
                        num_attention_heads=heads, intermediate_size=4 * hidden,
                        rotary_pct=0.25, max_position_embeddings=2048, tie_word_embeddings=False)
    ckpt = folder / "ckpt"
    GPTNeoXForCausalLM(cfg).save_pretrained(str(ckpt))
    return ex, str(ckpt)


def bare(examples: Path, paths: list[str], groups: int, batch_tokens: int, use_gpu: bool,
         scorer_kind: str, compile_mode: str, dtype: str, threads: int) -> tuple[float, int]:
    """Seconds to score every group in this process (models loaded before the clock); on CPU
    with the actor's thread count (trajectories.cpus_per_actor)."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq
    import torch

    from s2l_ray.core.losses import score_block
    from s2l_ray.io.parquet import parquet_files
    from s2l_ray.stages.trajectories import (
        INPUT_COLUMNS,
        load_scoring_models,
        make_scorer,
        with_groups,
    )

    device = torch.device("cuda" if use_gpu else "cpu")
    if not use_gpu:
        torch.set_num_threads(threads)
    models, amp = load_scoring_models(paths, dtype, device)  # as the stage's actor loads them
    scorer = make_scorer(scorer_kind, models, device, batch_tokens, amp, compile_mode)
    # The parts in sorted order: the global row order the stage's groups are cut from.
    table = with_groups(pq.read_table(parquet_files(examples, "ingest"), columns=INPUT_COLUMNS),
                        groups)
    first = table.filter(pc.equal(table["group"], 0))
    score_block(models, first.slice(0, 16), batch_tokens, device, amp, scorer)  # warm-up
    if use_gpu:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    rows = 0
    for g in range(groups):
        out, _ = score_block(models, table.filter(pc.equal(table["group"], g)), batch_tokens,
                             device, amp, scorer)
        rows += out.num_rows
    if use_gpu:
        torch.cuda.synchronize()
    return time.perf_counter() - t0, rows


def stage(examples: Path, tmp: Path, paths: list[str], groups: int, cfg: Any,
          use_gpu: bool, n: int) -> tuple[float, float, int]:
    """(stage seconds, seconds after the actor was ready, rows written)."""
    import pyarrow.parquet as pq
    import ray

    from s2l_ray.stages import trajectories as traj

    ready = tmp.parent / "actor_ready"
    tmp.mkdir(parents=True, exist_ok=True)  # the stage's actors publish one file per group here

    class TimedScorer(traj.TrajectoryScorer):
        """The stage's actor, noting when its models are loaded (defined here, so Ray ships
        it by value; the stage looks the class up by name when it builds the pipeline)."""

        def __init__(self, *a: Any, **kw: Any) -> None:
            super().__init__(*a, **kw)
            with open(ready, "a") as f:
                f.write(f"{time.time()}\n")

    sink = ray.remote(num_cpus=0)(traj._ActorCount).remote()
    original, traj.TrajectoryScorer = traj.TrajectoryScorer, TimedScorer
    try:
        started = time.time()
        plan, key = traj.examples_plan(examples, groups, n)  # footers only, as the stage does
        # No group done by an earlier run: every group is scored, as in a first run.
        _, progress = traj._score(cfg, tmp, paths, plan, {}, key, use_gpu, sink, n)
        wall = progress["seconds"]
        ended = time.time()
    finally:
        traj.TrajectoryScorer = original
        ray.kill(sink)
    first_ready = min(float(x) for x in ready.read_text().split())
    rows = sum(pq.read_metadata(f).num_rows for f in tmp.glob("*.parquet"))
    return wall, ended - max(started, first_ready), rows


def main(argv: list[str] | None = None) -> int:
    import pyarrow.parquet as pq
    import torch

    from s2l_ray.config import load_config
    from s2l_ray.runtime import init_ray, quiet_ray_data
    from s2l_ray.stages.trajectories import n_groups

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--examples", type=int, default=None, help="default 20000 GPU, 64 CPU")
    p.add_argument("--model", default=None, help="pythia-70m, pythia-160m or tiny "
                   "(default pythia-70m on GPU, tiny on CPU)")
    p.add_argument("--checkpoints", type=int, default=4)
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--batch-tokens", type=int, default=None, help="default 65536 GPU, 4096 CPU")
    p.add_argument("--set", nargs="*", default=[], help="extra config overrides (key=value)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = p.parse_args(argv)
    gpu = (args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()))
    n = args.examples or (20000 if gpu else 64)
    model = args.model or ("pythia-70m" if gpu else "tiny")
    batch_tokens = args.batch_tokens or (65536 if gpu else 4096)
    work = Path(tempfile.mkdtemp(prefix="s2l_ray_overhead_"))
    try:
        examples, ckpt = write_inputs(work, n, model, args.max_length, 0)
        paths = [ckpt] * args.checkpoints
        cfg = load_config(None, [f"run.output_dir={work / 'run'}",
                                 f"trajectories.batch_tokens={batch_tokens}",
                                 f"trajectories.use_gpu={'true' if gpu else 'false'}",
                                 *([] if gpu else ["trajectories.cpus_per_actor=1"]),
                                 *args.set])
        t = cfg.trajectories
        tokens = int(sum(pq.read_table(examples, columns=["n_tokens"])["n_tokens"].to_pylist()))
        groups = n_groups(n, tokens, batch_tokens)
        init_ray(num_cpus=None if gpu else 2)
        quiet_ray_data()
        s_wall, s_warm, s_rows = stage(examples, work / "out", paths, groups, cfg, gpu, n)
        b_wall, b_rows = bare(examples, paths, groups, batch_tokens, gpu, t.scorer, t.compile,
                              t.dtype, max(1, int(t.cpus_per_actor)))
        if not s_rows == b_rows == n:
            raise RuntimeError(f"rows: stage {s_rows}, bare {b_rows}, expected {n}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    dev = torch.cuda.get_device_name() if gpu else f"cpu x{torch.get_num_threads()}"
    table = "\n".join([
        f"# Ray Data overhead of the trajectory stage ({dev}, torch {torch.__version__})", "",
        f"{n} examples ({tokens} tokens, lengths 16-{args.max_length} log-normal), model "
        f"{model}, T={args.checkpoints}, scorer `{t.scorer}` (compile {t.compile}), "
        f"{batch_tokens} tokens per batch, {groups} groups, 1 actor. Stage = plan groups (footers)"
        " + actor start and model load + read + score + write, Ray already up (the second row "
        "starts the clock when the actor has loaded its models: the part that grows with the "
        "data); bare = the same scorer on the same groups in one process, models loaded.", "",
        "| path | seconds | examples/s | tokens/s | bare / stage |",
        "| --- | --- | --- | --- | --- |",
        f"| stage (Ray Data) | {s_wall:.2f} | {n / s_wall:.1f} | {tokens / s_wall:.0f} | "
        f"{b_wall / s_wall:.2f}x |",
        f"| stage after its actor was ready | {s_warm:.2f} | {n / s_warm:.1f} | "
        f"{tokens / s_warm:.0f} | {b_wall / s_warm:.2f}x |",
        f"| bare scorer | {b_wall:.2f} | {n / b_wall:.1f} | {tokens / b_wall:.0f} | 1.00x |",
    ]) + "\n"
    sys.stdout.write("\n" + table)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"ray_overhead_{'gpu' if gpu else 'cpu'}.md").write_text(table, encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
