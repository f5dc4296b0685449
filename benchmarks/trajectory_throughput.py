"""Benchmark: loss-trajectory throughput, several ways, on the same data in the same run.

  (a) the original S2L way: one example at a time, one checkpoint at a time, HF's
      `model(ids, labels=labels).loss` (a host sync per example);
  (b) a plain batched HF loop: padded batches in data order (no length bucketing), one checkpoint
      at a time, full (B, L, V) logits in float32, per-row mean response loss;
  (c) `padded`: `core.losses.score_block` with its default scorer (the stage's position groups,
      length-sorted windows, token-budget padded batches, every checkpoint per batch,
      response-only chunked output head, one pinned copy per batch);
  (d) `packed`: the same `score_block` with `core.packed_loss.PackedScorer` (no padding,
      per-sequence attention: "varlen" = one packed row + varlen attention, "mask" = rows with
      HF's block-diagonal mask), optionally compiled (`--compile`).
The stage's scorer is whichever `trajectories.scorer` names (default shown in the table).

Variants of (c)/(d) are named by suffixes: `+bf16w` casts the weights to bf16 instead of
autocasting float32 weights (`trajectories.dtype=bf16-weights`), `+dyn` compiles with dynamic
shapes instead of padding every batch to one shape (with --compile), `+ls` takes the head's
cross-entropy through F.cross_entropy instead of the compiled fused reduction
(`losses.token_ce`), `@N` uses N tokens
per batch; e.g. `--methods packed-varlen,packed-varlen+bf16w,packed-varlen@16384`.
`--profile N` then prints, per model, the CUDA kernels that took the most time while the stage's
scorer (and its +bf16w variant) scored N examples.

Models are GPT-NeoX shaped like Pythia (random weights from a config, nothing downloaded):
pythia-70m = hidden 512 / 6 layers / 8 heads, pythia-160m = 768 / 12 / 12, vocabulary 50304;
T checkpoints are T copies. Lengths are log-normal (sigma 0.7) with the given mean, clipped to
[min, max], 20-60% of each example being prompt.

It prints examples/s and tokens/s per method, ratios against (a) and (b), and the share of the
FLOP floor: 2 x (non-embedding params + vocab x hidden) x tokens x T / peak, the peak being a
large matmul in the compute dtype (bf16 on GPU) measured in the same run (or --peak-flops).
The table goes to benchmarks/results/trajectory_throughput_<cpu|gpu>.md (the card in its title).

    python benchmarks/trajectory_throughput.py --device cuda           # 2048 examples, <= 512
    python benchmarks/trajectory_throughput.py --device cpu --examples 64 --max-length 256
"""

from __future__ import annotations

import argparse
import copy
import logging
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
log = logging.getLogger("trajectory_throughput")
SHAPES = {"pythia-70m": (512, 6, 8), "pythia-160m": (768, 12, 12),
          "tiny": (64, 2, 4)}  # tiny: dry runs of the script only
VOCAB = 50304


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--examples", type=int, default=None,
                   help="examples scored by (b) and (c) (default: 2048 on GPU, 64 on CPU)")
    p.add_argument("--examples-a", type=int, default=None,
                   help="examples for the slow one-at-a-time (a); its rate is per example, so "
                        "a subset is fair (default: same as --examples, at most 256)")
    p.add_argument("--methods", default="a,b,padded,packed-varlen,packed-mask",
                   help="comma-separated: a, b, padded, packed-varlen, packed-mask, and with "
                        "--compile packed-varlen-compiled; suffixes +bf16w, +dyn, +ls, @N (above)")
    p.add_argument("--profile", type=int, default=0,
                   help="profile the stage's scorer on this many examples per model (0: off)")
    p.add_argument("--compile", default=None,
                   help="also run packed-varlen under torch.compile with this mode (default, "
                        "reduce-overhead)")
    p.add_argument("--mean-length", type=float, default=200.0,
                   help="target mean of the log-normal lengths before clipping, tokens")
    p.add_argument("--row-tokens", type=int, default=512, help="packed-mask: tokens per row")
    p.add_argument("--models", default="pythia-70m,pythia-160m",
                   help=f"comma-separated shapes from {', '.join(SHAPES)}")
    p.add_argument("--checkpoints", type=int, default=4, help="T, checkpoints per example")
    p.add_argument("--min-length", type=int, default=16, help="shortest example, tokens")
    p.add_argument("--max-length", type=int, default=512, help="longest example, tokens")
    p.add_argument("--batch-tokens", type=int, default=None,
                   help="(c), (d): tokens per batch, as trajectories.batch_tokens "
                        "(default: 65536 on GPU, 4096 on CPU)")
    p.add_argument("--batch-rows", type=int, default=None,
                   help="(b): rows per padded batch (default: batch-tokens // max-length, the "
                        "same memory budget at the longest length)")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cuda or cpu")
    p.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp32"],
                   help="auto: bf16 autocast on GPU, fp32 on CPU (the stage's policy); all "
                        "three methods use it")
    p.add_argument("--peak-flops", type=float, default=None,
                   help="peak FLOP/s for the floor (default: a matmul measured in this run)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"),
                   help="folder for trajectory_throughput_<device>.md")
    return p.parse_args(argv)


def make_data(n: int, lo: int, hi: int, seed: int, mean: float = 200.0
              ) -> tuple[list[np.ndarray], np.ndarray]:
    """n examples: log-normal lengths (sigma 0.7, mean `mean` before clipping to [lo, hi]),
    skewed short as instruction data is; random token ids."""
    rng = np.random.default_rng(seed)
    mu = np.log(mean) - 0.7**2 / 2  # E[exp(N(mu, s^2))] = exp(mu + s^2 / 2)
    lengths = np.clip(np.exp(rng.normal(mu, 0.7, n)), lo, hi).astype(int)
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


def method_c(models, rows, n_prompt, device, amp_dtype, batch_tokens: int,
             scorer: Any = None) -> np.ndarray:
    """The actor's own function on one block: the stage's groups, sorted windows, all checkpoints;
    `scorer` None is the padded default, else e.g. PackedScorer(...).score_sorted."""
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
    out, _ = score_block(models, block, batch_tokens, device, amp_dtype, scorer)
    order = {name: i for i, name in enumerate(out["id"].to_pylist())}
    losses = np.array(out["losses"].to_pylist(), np.float32)
    return losses[[order[n] for n in names]]


def matmul_peak(device: Any, amp_dtype: Any) -> float:
    """Best FLOP/s of a large square matmul in the compute dtype (bf16 or fp32)."""
    import torch

    n = 8192 if device.type == "cuda" else 1536
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
    """The card's full name on CUDA ('NVIDIA H100 80GB HBM3'), else 'cpu'."""
    import torch

    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def make_runner(method: str, models, device, amp_dtype, args, batch_tokens: int,
                batch_rows: int):
    """method name -> fn(models, rows, n_prompt) -> losses (N, T). Suffixes (module doc):
    +bf16w (bf16 weights, no autocast), +ls (log_softmax cross-entropy), @N (batch tokens)."""
    import torch

    from s2l_ray.core.packed_loss import PackedScorer

    base, _, at = method.partition("@")
    name, *flags = base.split("+")
    bt = int(at) if at else batch_tokens
    if name == "a":
        return lambda ms, r, p: method_a(ms, r, p, device, amp_dtype)
    if name == "b":
        return lambda ms, r, p: method_b(ms, r, p, device, amp_dtype, batch_rows)
    amp = None if "bf16w" in flags else amp_dtype
    ce = "log_softmax" if "ls" in flags else "auto"
    cache: dict[int, Any] = {}  # one scorer (and compiled graph, bf16 copy) per model list

    def scorer_for(ms):
        key = id(ms[0]) * 100 + len(ms)
        if key not in cache:
            use = [copy.deepcopy(m).to(torch.bfloat16) for m in ms] if "bf16w" in flags else ms
            if name == "padded":
                if ce != "auto":
                    raise ValueError("+ls applies to the packed scorers only")
                sc = None
            else:
                sc = PackedScorer(use, device, bt, attention="mask" if name.startswith(
                    "packed-mask") else "varlen", row_tokens=args.row_tokens, amp_dtype=amp,
                    compile_mode=args.compile if name.endswith("-compiled") else None,
                    ce=ce, dynamic="dyn" in flags).score_sorted
            cache[key] = (use, sc)
        return cache[key]

    def run(ms, r, p):
        use, sc = scorer_for(ms)
        return method_c(use, r, p, device, amp, bt, sc)
    return run


def profile_scorer(method: str, models, rows, n_prompt, device, amp_dtype, args,
                   batch_tokens: int) -> str:
    """The CUDA kernels that took the most time while `method` scored `rows` (a table)."""
    from torch.profiler import ProfilerActivity, profile

    run = make_runner(method, models, device, amp_dtype, args, batch_tokens, 1)
    run(models, rows[:8], n_prompt[:8])  # warm-up outside the trace
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        timed(run, device, models, rows, n_prompt)
    avg = prof.key_averages()
    for key in ("self_device_time_total", "self_cuda_time_total", "self_cpu_time_total"):
        try:
            return avg.table(sort_by=key, row_limit=25, max_name_column_width=70)
        except (AttributeError, KeyError, ValueError):
            continue
    return avg.table(row_limit=25)


def main(argv: list[str] | None = None) -> int:
    import torch

    from s2l_ray.config import S2LConfig
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
    n_a = min(args.examples_a or min(n, 256), n)
    hi = args.max_length
    batch_tokens = args.batch_tokens or (65536 if gpu else 4096)
    batch_rows = args.batch_rows or max(1, batch_tokens // hi)
    amp_dtype = autocast_dtype(args.dtype, gpu)
    dtype_name = "bf16" if amp_dtype is not None else "fp32"
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if args.compile and not any(m.startswith("packed-varlen-compiled") for m in methods):
        methods.append("packed-varlen-compiled")
    stage_scorer = S2LConfig().trajectories.scorer
    measured = matmul_peak(device, amp_dtype)
    peak = args.peak_flops or measured
    rows, n_prompt = make_data(n, args.min_length, hi, args.seed, args.mean_length)
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
        f"{batch_rows} rows per batch, the scorers {batch_tokens} tokens per batch, "
        f"packed-mask rows of {args.row_tokens}. Peak for the floor {peak:.3g} FLOP/s "
        f"({'given' if args.peak_flops else 'measured'}; measured {dtype_name} matmul "
        f"{measured:.3g}). The floor counts the output head on every token; the scorers run it "
        f"on response tokens only, so they can pass 100%. The stage's scorer "
        f"(trajectories.scorer default) is `{stage_scorer}`"
        f"{' (packed-varlen on this device)' if stage_scorer == 'packed' else ''}.", "",
        "| model | method | examples/s | tokens/s | s | vs (a) | vs (b) | % of FLOP floor | "
        "max abs diff vs (a) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    path = Path(args.out) / f"trajectory_throughput_{'gpu' if gpu else 'cpu'}.md"
    path.parent.mkdir(parents=True, exist_ok=True)

    def save(table_lines: list[str]) -> str:
        table = "\n".join(table_lines) + "\n"
        path.write_text(table, encoding="utf-8")
        return table

    def table_rows(shape: str, res: dict[str, tuple[float, float, float, str]],
                   per_token: int) -> list[str]:
        out = []
        for method, (rate, toks, sec, diff) in res.items():
            ra = res.get("a", (float("nan"),))[0]
            rb = res.get("b", (float("nan"),))[0]
            vs_a = f"{rate / ra:.1f}x" if method not in ("a",) and ra == ra else ""
            vs_b = f"{rate / rb:.2f}x" if method not in ("a", "b") and rb == rb else ""
            floor = 100 * per_token * toks * args.checkpoints / peak if toks == toks else 0.0
            out.append(f"| {shape} | {method} | {rate:.2f} | {toks:.0f} | {sec:.2f} | {vs_a} | "
                       f"{vs_b} | {floor:.1f}% | {diff} |")
        return out

    for shape in args.models.split(","):
        models, params = build_models(shape.strip(), args.checkpoints, device)
        per_token = 2 * (params["non_embedding"] + VOCAB * params["hidden"])
        res: dict[str, tuple[float, float, float, str]] = {}  # rate, tok/s, s, diff or error
        ref = None
        for method in methods:
            n_m = n_a if method == "a" else n
            try:
                run = make_runner(method, models, device, amp_dtype, args, batch_tokens,
                                  batch_rows)
                # warm-up: allocator, kernels, cuBLAS/MKL setup, compilation
                run(models[:1] if method in ("a", "b") else models, rows[:8], n_prompt[:8])
                if "-compiled" in method:  # compile the window sizes used below too
                    run(models, rows[:n], n_prompt[:n])
                out, sec = timed(run, device, models, rows[:n_m], n_prompt[:n_m])
            except Exception as e:  # report it in the table, go on with the other methods
                log.exception("%s %s failed", shape, method)
                res[method] = (float("nan"), float("nan"), float("nan"),
                               f"failed: {type(e).__name__}: {str(e)[:120]}")
                continue
            if method == "a":
                ref = out
            diff = "" if ref is None else f"{float(np.abs(out[:n_a] - ref).max()):.2e}"
            tok = tokens_a if method == "a" else tokens
            res[method] = (n_m / sec, tok / sec, sec, diff)
            log.info("%s %s: %.1f ex/s, %.0f tok/s, %.1f%% of the floor", shape, method,
                     n_m / sec, tok / sec, 100 * per_token * tok * args.checkpoints / peak / sec)
            save(lines + table_rows(shape, res, per_token))  # a step cut short keeps these
        if args.profile:
            for method in ("packed-varlen", "packed-varlen+bf16w"):
                try:
                    table = profile_scorer(method, models, rows[:args.profile],
                                           n_prompt[:args.profile], device, amp_dtype, args,
                                           batch_tokens)
                    log.info("profile of %s %s over %d examples:\n%s", shape, method,
                             args.profile, table)
                except Exception:  # a profile is extra information: never fails the run
                    log.exception("profiling %s %s failed", shape, method)
        lines += table_rows(shape, res, per_token)
        del models
        if gpu:
            torch.cuda.empty_cache()
    sys.stdout.write("\n" + save(lines))
    log.info("wrote %s", path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
