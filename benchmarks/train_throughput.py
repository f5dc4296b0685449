"""Reference-training throughput: tokens/s per worker of the train-ref step, and its MFU.

Measures, in one run and on the same batches, the step the train-ref workers run
(`training.worker.train_micro_step`: DeepSpeed engine with the project's `deepspeed_config` and
default ZeRO stage, response-only loss from `pad_batch`, no host sync per step) against a plain
PyTorch AdamW loop (the baseline: autocast to the same precision, one host sync at the end), for
Pythia-shaped models. Prints the ratio and the model-FLOPs utilisation: 6 x params x tokens /
time against the matmul peak (bf16 on GPU) measured here in the same run (or given).

    python benchmarks/train_throughput.py --device cpu --models nano micro --steps 20
    python benchmarks/train_throughput.py --device cuda --models pythia-70m pythia-160m
      -> benchmarks/results/train_throughput_gpu.md (the card's name in its title)

`--ray-train` times the whole training path instead, as a demo trial runs it: the project's
`training.driver.fit` (Ray Train TorchTrainer, one worker, DeepSpeed, Ray Data shard, reports and
checkpoints) on synthetic demo-shaped rows (16-27 tokens) with the `tiny:small` target, against a
plain PyTorch AdamW loop on the same model shape and batches in this process, on as many torch
threads as the worker gets. A step's cost is the slope between two runs of different lengths
(fixed costs such as starting the workers cancel), and the whole fit's wall time is shown too:

    python benchmarks/train_throughput.py --ray-train --steps 100 400 [--out-name NAME]
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

SHAPES = {  # hidden, layers, heads, vocab
    "nano": (32, 2, 2, 512), "micro": (64, 2, 4, 512), "base": (256, 6, 8, 512),
    "pythia-70m": (512, 6, 8, 50304), "pythia-160m": (768, 12, 12, 50304),
}


def matmul_peak(device: str, dtype) -> float:
    import torch

    n = 8192 if device == "cuda" else 1024
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    if device == "cuda":
        torch.cuda.synchronize()
    reps, t = 20, time.perf_counter()
    for _ in range(reps):
        a @ b
    if device == "cuda":
        torch.cuda.synchronize()
    return 2 * n**3 * reps / (time.perf_counter() - t)


def batches(vocab: int, n: int, batch: int, max_len: int, seed: int = 0) -> list:
    import random

    from s2l_ray.core.tokens import pad_batch

    rng = random.Random(seed)
    out = []
    for _ in range(n):
        lens = [min(max_len, int(rng.lognormvariate(4.6, 0.6)) + 16) for _ in range(batch)]
        rows = [[rng.randrange(2, vocab) for _ in range(n_)] for n_ in lens]
        out.append(pad_batch(rows, [n_ // 3 for n_ in lens], pad_id=0))
    return out


def run(name: str, device: str, steps: int, batch: int, max_len: int,
        zero_stages: list[int] | None = None) -> dict:
    import deepspeed
    import torch
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    from s2l_ray.config import S2LConfig
    from s2l_ray.training.worker import deepspeed_config, resolve_precision, train_micro_step

    h, layers, heads, vocab = SHAPES[name]
    cfg = GPTNeoXConfig(hidden_size=h, num_hidden_layers=layers, num_attention_heads=heads,
                        intermediate_size=4 * h, vocab_size=vocab, rotary_pct=0.25)
    data = batches(vocab, steps + 2, batch, max_len)
    tokens = sum(int(m.sum()) for _, m, _ in data[2:])
    on_gpu = device == "cuda"
    precision = resolve_precision("auto", on_gpu)
    default_zero = S2LConfig().reference.zero_stage
    res: dict = {"model": name, "precision": precision, "zero_stages": []}
    modes = ["plain"] + [f"zero{z}" for z in (zero_stages or [default_zero])]
    for mode in modes:
        torch.manual_seed(0)
        model = GPTNeoXForCausalLM(cfg).to(device)
        n_params = sum(p.numel() for p in model.parameters())
        if mode == "plain":
            opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
            dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)

            def step(ids, mask, labels, model=model, opt=opt, dtype=dtype):
                with torch.autocast(device, dtype=dtype, enabled=dtype is not None):
                    loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
        else:
            zero = int(mode[4:])
            ds = deepspeed_config(zero, batch, 1, 1, 1e-4, 0.0, precision, on_gpu)
            try:
                engine, *_ = deepspeed.initialize(model=model,
                                                  model_parameters=model.parameters(), config=ds)
            except Exception as e:  # e.g. a ZeRO stage this DeepSpeed refuses in bf16
                res[f"{mode}_tok_s"] = float("nan")
                res[f"{mode}_error"] = f"{type(e).__name__}: {str(e)[:100]}"
                res["zero_stages"].append(zero)
                continue

            def step(ids, mask, labels, engine=engine):
                return train_micro_step(engine, ids, mask, labels, device)
        try:
            for i, (ids, mask, labels) in enumerate(data):
                if i == 2:  # two warm-up steps, then time
                    if on_gpu:
                        torch.cuda.synchronize()
                    t = time.perf_counter()
                if mode == "plain":
                    step(ids.to(device), mask.to(device), labels.to(device))
                else:
                    step(ids, mask, labels)
            if on_gpu:
                torch.cuda.synchronize()
            res[f"{mode}_tok_s"] = tokens / (time.perf_counter() - t)
        except Exception as e:  # a variant DeepSpeed refuses is reported, the others go on
            res[f"{mode}_tok_s"] = float("nan")
            res[f"{mode}_error"] = f"{type(e).__name__}: {str(e)[:100]}"
        if mode != "plain":
            res["zero_stages"].append(zero)
        res["params"] = n_params
        del step, model
        if on_gpu:
            torch.cuda.empty_cache()
    return res


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--models", nargs="+", default=["nano", "micro", "base"],
                   choices=list(SHAPES))
    p.add_argument("--steps", type=int, nargs="+", default=[20],
                   help="timed steps (--ray-train: two step counts, e.g. 100 400)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--max-len", type=int, default=256)
    p.add_argument("--peak", type=float, default=None,
                   help="matmul peak FLOP/s for MFU (default: measured in this run)")
    p.add_argument("--zero-stages", type=int, nargs="+", default=None,
                   help="DeepSpeed ZeRO stages to time (default: reference.zero_stage's)")
    p.add_argument("--out", default=str(Path(__file__).parent / "results"),
                   help="folder for train_throughput_<cpu|gpu>.md")
    p.add_argument("--ray-train", action="store_true",
                   help="time training.driver.fit inside Ray Train (see above); --steps takes "
                        "two step counts")
    p.add_argument("--cpus-per-worker", type=float, default=1.0)
    p.add_argument("--zero-stage", type=int, default=1, help="--ray-train: target.zero_stage")
    p.add_argument("--log-lines", type=int, default=20,
                   help="--ray-train: fit's log_lines (20: train-ref's; a sweep trial uses 4)")
    p.add_argument("--label", default="", help="--ray-train: a name for this code version")
    p.add_argument("--out-name", default=None,
                   help="--ray-train: append the row to benchmarks/results/<NAME>.md")
    args, rest = p.parse_known_args(argv)
    if args.ray_train:
        return ray_train_main(args, rest)
    args = p.parse_args(argv)
    import torch
    import torch.distributed as dist

    from s2l_ray.config import S2LConfig

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29533")
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    dist.init_process_group("nccl" if args.device == "cuda" else "gloo")
    peak_dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    peak = args.peak or matmul_peak(args.device, peak_dtype)
    args.steps = args.steps[0]
    rows = [run(m, args.device, args.steps, args.batch, args.max_len, args.zero_stages)
            for m in args.models]
    dev = (torch.cuda.get_device_name() if args.device == "cuda"
           else f"cpu x{torch.get_num_threads()}")
    lines = [f"# Reference-training throughput ({dev}, torch {torch.__version__})", "",
             f"batch {args.batch}, lengths log-normal <= {args.max_len}, {args.steps} timed "
             f"steps, 1 worker; train-ref step = `training.worker.train_micro_step` under "
             f"DeepSpeed ZeRO-n (the config's default is {S2LConfig().reference.zero_stage}); "
             f"{'bf16' if args.device == 'cuda' else 'fp32'} matmul peak {peak:.3g} FLOP/s "
             f"({'given' if args.peak else 'measured in this run'}). MFU = 6 x params x "
             "tokens/s / peak (attention FLOPs not counted).", "",
             "| model | params | precision | step | tok/s | vs plain | MFU |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        plain = r["plain_tok_s"]
        for mode in ["plain"] + [f"zero{z}" for z in r["zero_stages"]]:
            rate = r[f"{mode}_tok_s"]
            name = "plain PyTorch AdamW" if mode == "plain" else f"train-ref, ZeRO-{mode[4:]}"
            err = r.get(f"{mode}_error")
            lines.append(f"| {r['model']} | {r['params']:,} | {r['precision']} | {name} | "
                         + (f"failed: {err} | | |" if err else
                            f"{rate:,.0f} | {rate / plain:.2f}x | "
                            f"{100 * 6 * r['params'] * rate / peak:.1f}% |"))
    table = "\n".join(lines) + "\n"
    print(table)
    out = Path(args.out) / f"train_throughput_{'gpu' if args.device == 'cuda' else 'cpu'}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(table)
    dist.destroy_process_group()


DEMO_ROWS, DEMO_BATCH = 1960, 16  # the demo's training set and target batch


def demo_rows(n: int, vocab: int, seed: int = 0) -> list[dict]:
    """Tokenized rows shaped like the demo's: 16-27 tokens, the last 8 the response."""
    import random

    rng = random.Random(seed)
    out = []
    for i in range(n):
        length = rng.randint(16, 27)
        out.append({"id": f"r{i:05d}", "input_ids": [rng.randrange(2, vocab)
                                                     for _ in range(length)],
                    "n_prompt_tokens": length - 8})
    return out


def plain_seconds_per_step(model_dir: str, rows: list[dict], steps: int, threads: int) -> float:
    """The baseline: plain AdamW (clipping as DeepSpeed's config does) on the demo batches."""
    import torch
    from transformers import AutoModelForCausalLM

    from s2l_ray.core.tokens import pad_batch

    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_pretrained(model_dir)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        n = len(rows) // DEMO_BATCH
        t = 0.0
        for i in range(steps + 5):
            if i == 5:  # five warm-up steps
                t = time.perf_counter()
            chunk = rows[(i % n) * DEMO_BATCH:(i % n + 1) * DEMO_BATCH]
            ids, mask, labels = pad_batch([r["input_ids"] for r in chunk],
                                          [r["n_prompt_tokens"] for r in chunk], pad_id=0)
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
        return (time.perf_counter() - t) / steps
    finally:
        torch.set_num_threads(old)


def ray_train_main(args: argparse.Namespace, overrides: list[str]) -> None:
    """`--ray-train`: fit() inside Ray Train at two step counts vs the plain loop."""
    import json
    import platform
    import tempfile

    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch

    from s2l_ray.config import load_config
    from s2l_ray.models.tiny import build_tiny_model
    from s2l_ray.runtime import init_ray
    from s2l_ray.training.driver import fit, plan_training

    if len(args.steps) != 2 or args.steps[0] >= args.steps[1]:
        raise SystemExit("--ray-train needs --steps SHORT LONG, e.g. --steps 100 400")
    threads = max(1, int(args.cpus_per_worker))  # what Ray sets OMP_NUM_THREADS to
    with tempfile.TemporaryDirectory(prefix="s2l-train-bench-") as tmp:
        root = Path(tmp)
        model_dir = build_tiny_model(root / "model", preset="small")
        vocab = json.loads((root / "model" / "config.json").read_text())["vocab_size"]
        rows = demo_rows(DEMO_ROWS, vocab)
        (root / "examples").mkdir()
        pq.write_table(pa.Table.from_pylist(rows), root / "examples" / "part-0.parquet")
        plain = plain_seconds_per_step(model_dir, rows, 100, threads)
        init_ray(num_cpus=2)
        walls = []
        for steps in args.steps:
            cfg = load_config(None, [
                f"run.output_dir={root / 'run'}", f"target.model={model_dir}",
                f"target.train_steps={steps}", f"target.batch_size={DEMO_BATCH}",
                "target.grad_accum=1", "target.num_checkpoints=1", "target.lr=1e-3",
                f"target.zero_stage={args.zero_stage}",
                f"target.cpus_per_worker={args.cpus_per_worker}", *overrides])
            plan = plan_training(cfg.target, "target", len(rows))
            work = root / f"work{steps}"
            work.mkdir()
            t = time.perf_counter()
            fit(cfg, cfg.target, "target", root / "examples", plan, work, model_dir,
                log_lines=args.log_lines)
            walls.append(time.perf_counter() - t)
    per_step = (walls[1] - walls[0]) / (args.steps[1] - args.steps[0])
    row = (f"| {args.label or '-'} | {args.log_lines} | ZeRO-{args.zero_stage} | "
           f"{args.cpus_per_worker:g} | "
           f"{plain * 1e3:.1f} | {per_step * 1e3:.1f} | {per_step / plain:.1f}x | "
           f"{args.steps[0]}: {walls[0]:.1f} s, {args.steps[1]}: {walls[1]:.1f} s |")
    head = [f"# Target training step inside Ray Train (cpu x{torch.get_num_threads()}, "
            f"{platform.processor() or platform.machine()})", "",
            f"`benchmarks/train_throughput.py --ray-train`: `training.driver.fit` on "
            f"{DEMO_ROWS} demo-shaped rows, batch {DEMO_BATCH}, `tiny:small`, one worker, "
            "one checkpoint, `log lines` progress lines logged (before the fix each was also a "
            "`ray.train.report`); step = slope between the two fits' wall times; plain = PyTorch "
            f"AdamW in the benchmark process on {threads} thread(s), same batches.", "",
            "| code | log lines | DeepSpeed | CPUs/worker | plain ms/step | fit ms/step | "
            "vs plain | fit wall (steps: s) |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    print("\n".join([*head, row]))
    if args.out_name:
        out = Path(args.out) / f"{args.out_name}.md"
        if not out.is_file():
            out.write_text("\n".join(head) + "\n")
        with open(out, "a") as f:
            f.write(row + "\n")


if __name__ == "__main__":
    main()
