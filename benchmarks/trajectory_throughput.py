"""Benchmark: loss-trajectory throughput, three ways, on the same data in the same run.

  (a) the original S2L way: one example at a time, one checkpoint at a time, HF's
      `model(ids, labels=labels).loss` (a host sync per example);
  (b) a plain batched HF loop: padded batches in data order (no length bucketing), one checkpoint
      at a time, full (B, L, V) logits in float32, per-row mean response loss;
  (c) this stage's compute path: `s2l_ray.core.losses.score_block`, the very function the trajectory
      actor calls per Ray Data block (hash groups, length sorting, token-budget batches, every
      checkpoint per batch, response-only chunked output head, one pinned copy per batch).

Models are GPT-NeoX shaped like Pythia (random weights from a config, nothing downloaded):
pythia-70m = hidden 512 / 6 layers / 8 heads, pythia-160m = 768 / 12 / 12, vocabulary 50304;
T checkpoints are T copies. Lengths follow a log-normal mix clipped to [min, max] tokens (skewed
short, as instruction data is), 20-60% of each example being prompt.

It prints examples/s and tokens/s per method, the ratios (c)/(a) and (c)/(b), and (c) against
the FLOP floor 2 x (non-embedding params + vocab x hidden) x tokens x T / peak. The peak is
--peak-flops (default 786e12, H100 dense bf16) on GPU; on CPU it is a float32 matmul peak measured
in the same run. The markdown table goes to benchmarks/results/trajectory_throughput_<device>.md.

    python benchmarks/trajectory_throughput.py                     # GPU: 2048 examples, 64-1024
    python benchmarks/trajectory_throughput.py --device cpu --examples 64 --max-length 256
"""

from __future__ import annotations

import argparse
import copy
import logging
import platform
import re
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
log = logging.getLogger("trajectory_throughput")
SHAPES = {"pythia-70m": (512, 6, 8), "pythia-160m": (768, 12, 12)}
VOCAB = 50304


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--examples", type=int, default=None,
                   help="examples scored by (b) and (c) (default: 2048 on GPU, 64 on CPU)")
    p.add_argument("--examples-a", type=int, default=None,
                   help="examples for the slow one-at-a-time (a); its rate is per example, so "
                        "a subset is fair (default: same as --examples, at most 512)")
    p.add_argument("--models", default="pythia-70m,pythia-160m",
                   help=f"comma-separated shapes from {', '.join(SHAPES)}")
    p.add_argument("--checkpoints", type=int, default=4, help="T, checkpoints per example")
    p.add_argument("--min-length", type=int, default=64, help="shortest example, tokens")
    p.add_argument("--max-length", type=int, default=None,
                   help="longest example, tokens (default: 1024 on GPU, 256 on CPU)")
    p.add_argument("--batch-tokens", type=int, default=None,
                   help="(c): padded tokens per batch, as trajectories.batch_tokens "
                        "(default: 65536 on GPU, 4096 on CPU)")
    p.add_argument("--batch-rows", type=int, default=None,
                   help="(b): rows per padded batch (default: batch-tokens // max-length, the "
                        "same memory budget at the longest length)")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cuda or cpu")
    p.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp32"],
                   help="auto: bf16 autocast on GPU, fp32 on CPU (the stage's policy); all "
                        "three methods use it")
    p.add_argument("--peak-flops", type=float, default=None,
                   help="peak FLOP/s for the floor (default: 786e12 on GPU; measured on CPU)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"),
                   help="folder for trajectory_throughput_<device>.md")
    return p.parse_args(argv)


def make_data(n: int, lo: int, hi: int, seed: int) -> tuple[list[np.ndarray], np.ndarray]:
    """n examples: log-normal lengths clipped to [lo, hi], skewed short (median lo x
    (hi/lo)^0.35: 168 tokens for 64-1024), random token ids."""
    rng = np.random.default_rng(seed)
    median = lo * (hi / lo) ** 0.35
    lengths = np.clip(np.exp(rng.normal(np.log(median), 0.7, n)), lo, hi).astype(int)
    rows = [rng.integers(2, VOCAB, size=k, dtype=np.int64) for k in lengths]
    n_prompt = np.array([int(k * rng.uniform(0.2, 0.6)) for k in lengths])
    return rows, np.maximum(n_prompt, 1)


def build_models(shape: str, t: int, device: Any) -> tuple[list[Any], dict[str, int]]:
    import torch
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    hidden, layers, heads = SHAPES[shape]
    cfg = GPTNeoXConfig(vocab_size=VOCAB, hidden_size=hidden, num_hidden_layers=layers,
                        num_attention_heads=heads, intermediate_size=4 * hidden,
                        rotary_pct=0.25, max_position_embeddings=2048,
                        tie_word_embeddings=False)
    torch.manual_seed(0)
    base = GPTNeoXForCausalLM(cfg).eval()
    emb = base.get_input_embeddings().weight.numel() + base.get_output_embeddings().weight.numel()
    total = sum(p.numel() for p in base.parameters())
    models = [copy.deepcopy(base).to(device) for _ in range(t)]
    return models, {"hidden": hidden, "non_embedding": total - emb, "total": total}


def _sync(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def _amp(device: Any, amp_dtype: Any) -> Any:
    import contextlib

    import torch

    return (torch.autocast(device.type, dtype=amp_dtype) if amp_dtype is not None
            else contextlib.nullcontext())


def method_a(models, rows, n_prompt, device, amp_dtype) -> np.ndarray:
    """One example at a time, one checkpoint at a time: HF's loss, .item() per example."""
    import torch

    from s2l_ray.core.tokens import labels_for

    out = np.zeros((len(rows), len(models)), np.float32)
    with torch.inference_mode(), _amp(device, amp_dtype):
        for t, model in enumerate(models):
            for i, (r, npr) in enumerate(zip(rows, n_prompt)):
                x = torch.as_tensor(r, device=device)[None]
                y = torch.as_tensor(labels_for(r.tolist(), int(npr)), device=device)[None]
                out[i, t] = model(input_ids=x, labels=y).loss.item()
    return out


def method_b(models, rows, n_prompt, device, amp_dtype, batch_rows: int) -> np.ndarray:
    """Padded batches in data order, full float32 logits, one checkpoint at a time."""
    import torch
    import torch.nn.functional as F

    from s2l_ray.core.tokens import IGNORE_INDEX, pad_batch

    out = np.zeros((len(rows), len(models)), np.float32)
    with torch.inference_mode(), _amp(device, amp_dtype):
        for t, model in enumerate(models):
            for s in range(0, len(rows), batch_rows):
                ids, mask, labels = (x.to(device) for x in pad_batch(
                    [r.tolist() for r in rows[s:s + batch_rows]],
                    list(n_prompt[s:s + batch_rows]), pad_id=0))
                logits = model(input_ids=ids, attention_mask=mask).logits.float()  # (B, L, V)
                tgt = labels[:, 1:]
                ce = F.cross_entropy(logits[:, :-1].transpose(1, 2), tgt,
                                     ignore_index=IGNORE_INDEX, reduction="none")  # (B, L-1)
                loss = ce.sum(1) / (tgt != IGNORE_INDEX).sum(1)
                out[s:s + len(loss), t] = loss.cpu().numpy()
    return out


def method_c(models, rows, n_prompt, device, amp_dtype, batch_tokens: int) -> np.ndarray:
    """The actor's own function on one block: hash groups, sorted windows, all checkpoints."""
    import pyarrow as pa

    from s2l_ray.core.losses import score_block
    from s2l_ray.stages.trajectories import n_groups, with_groups

    names = [f"ex{i:07d}" for i in range(len(rows))]
    tokens = int(sum(len(r) for r in rows))
    block = with_groups(pa.table({
        "id": names, "source": pa.nulls(len(rows), pa.string()),
        "input_ids": pa.array([r.astype(np.int32) for r in rows], pa.list_(pa.int32())),
        "n_prompt_tokens": pa.array(n_prompt, pa.int32()),
        "n_tokens": pa.array([len(r) for r in rows], pa.int32())}),
        n_groups(len(rows), tokens, batch_tokens))
    out, _ = score_block(models, block, batch_tokens, device, amp_dtype)
    order = {name: i for i, name in enumerate(out["id"].to_pylist())}
    losses = np.array(out["losses"].to_pylist(), np.float32)
    return losses[[order[n] for n in names]]


def matmul_peak(device: Any, amp_dtype: Any) -> float:
    """Best FLOP/s of a large square matmul in the compute dtype (bf16 or fp32)."""
    import torch

    n = 4096 if device.type == "cuda" else 1536
    dtype = amp_dtype or torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    best = float("inf")
    for _ in range(5 if device.type == "cuda" else 3):
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(10 if device.type == "cuda" else 2):
            a @ b
        _sync(device)
        best = min(best, (time.perf_counter() - t0) / (10 if device.type == "cuda" else 2))
    return 2 * n**3 / best


def timed(fn, device, *args) -> tuple[np.ndarray, float]:
    _sync(device)
    t0 = time.perf_counter()
    out = fn(*args)
    _sync(device)
    return out, time.perf_counter() - t0


def device_name(device: Any) -> str:
    import torch

    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        m = re.search(r"([AHBL]\d{2,3}|RTX ?\d{4})", name)
        return (m.group(1) if m else name).replace(" ", "").lower()
    return "cpu"


def main(argv: list[str] | None = None) -> int:
    import torch

    from s2l_ray.core.losses import autocast_dtype

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    args = parse_args(argv)
    want = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available()
                                                       else "cpu")
    device = torch.device(want)
    gpu = device.type == "cuda"
    if args.threads:
        torch.set_num_threads(args.threads)
    n = args.examples or (2048 if gpu else 64)
    n_a = min(args.examples_a or min(n, 512), n)
    hi = args.max_length or (1024 if gpu else 256)
    batch_tokens = args.batch_tokens or (65536 if gpu else 4096)
    batch_rows = args.batch_rows or max(1, batch_tokens // hi)
    amp_dtype = autocast_dtype(args.dtype, gpu)
    dtype_name = "bf16" if amp_dtype is not None else "fp32"
    peak = args.peak_flops
    measured = matmul_peak(device, amp_dtype)
    if peak is None:
        peak = 786e12 if gpu else measured
    source = "given" if args.peak_flops else ("H100 bf16 default" if gpu else "measured")
    rows, n_prompt = make_data(n, args.min_length, hi, args.seed)
    tokens = int(sum(len(r) for r in rows))
    tokens_a = int(sum(len(r) for r in rows[:n_a]))
    log.info("%s, %s: %d examples (%d for (a)), %d tokens (mean %.0f), T=%d, peak %.3g FLOP/s "
             "(measured %.3g)", device_name(device), dtype_name, n, n_a, tokens, tokens / n,
             args.checkpoints, peak, measured)
    lines = [
        f"# Trajectory throughput on {device_name(device)} ({platform.processor() or 'cpu'}, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads)", "",
        f"{n} examples ({n_a} for (a)), lengths {args.min_length}-{hi} log-normal (mean "
        f"{tokens / n:.0f} tokens), T={args.checkpoints} checkpoints, {dtype_name}; (b) "
        f"{batch_rows} rows per batch, (c) {batch_tokens} tokens per batch. Peak for the floor "
        f"{peak:.3g} FLOP/s ({source}; measured {dtype_name} matmul {measured:.3g}). The floor "
        "counts the output head on every token; (c) runs it on response tokens only, so it "
        "can pass 100%.", "",
        "| model | method | examples/s | tokens/s | s | (c)/(a) | (c)/(b) | % of FLOP floor | "
        "max abs diff vs (a) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for shape in args.models.split(","):
        models, params = build_models(shape.strip(), args.checkpoints, device)
        per_token = 2 * (params["non_embedding"] + VOCAB * params["hidden"])
        # warm-up: first calls pay for allocator, kernels, MKL/cuBLAS setup
        warm = rows[:4]
        method_a(models[:1], warm, n_prompt[:4], device, amp_dtype)
        method_b(models[:1], warm, n_prompt[:4], device, amp_dtype, batch_rows)
        method_c(models[:1], warm, n_prompt[:4], device, amp_dtype, batch_tokens)
        la, sa = timed(method_a, device, models, rows[:n_a], n_prompt[:n_a], device, amp_dtype)
        lb, sb = timed(method_b, device, models, rows, n_prompt, device, amp_dtype, batch_rows)
        lc, sc = timed(method_c, device, models, rows, n_prompt, device, amp_dtype, batch_tokens)
        rate = {"a": n_a / sa, "b": n / sb, "c": n / sc}
        toks = {"a": tokens_a / sa, "b": tokens / sb, "c": tokens / sc}
        floor = per_token * tokens * args.checkpoints / peak  # seconds at peak for (c)'s work
        diff = {k: float(np.abs(v[:n_a] - la).max()) for k, v in (("b", lb), ("c", lc))}
        log.info("%s: (a) %.1f ex/s, (b) %.1f ex/s, (c) %.1f ex/s; (c)/(a) %.1fx, (c)/(b) "
                 "%.2fx, (c) at %.1f%% of the floor", shape, rate["a"], rate["b"], rate["c"],
                 rate["c"] / rate["a"], rate["c"] / rate["b"], 100 * floor / sc)
        names = {"a": "(a) one at a time", "b": "(b) batched HF", "c": "(c) this stage"}
        secs = {"a": sa, "b": sb, "c": sc}
        for k in "abc":
            ratio_a = f"{rate['c'] / rate['a']:.1f}x" if k == "c" else ""
            ratio_b = f"{rate['c'] / rate['b']:.2f}x" if k == "c" else ""
            work = per_token * (tokens_a if k == "a" else tokens) * args.checkpoints / peak
            lines.append(
                f"| {shape} | {names[k]} | {rate[k]:.2f} | {toks[k]:.0f} | {secs[k]:.1f} | "
                f"{ratio_a} | {ratio_b} | {100 * work / secs[k]:.1f}% | "
                f"{diff.get(k, 0.0):.2e} |")
        del models
        if gpu:
            torch.cuda.empty_cache()
    table = "\n".join(lines) + "\n"
    sys.stdout.write("\n" + table)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"trajectory_throughput_{device_name(device)}.md"
    path.write_text(table, encoding="utf-8")
    log.info("wrote %s", path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
