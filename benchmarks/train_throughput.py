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
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--max-len", type=int, default=256)
    p.add_argument("--peak", type=float, default=None,
                   help="matmul peak FLOP/s for MFU (default: measured in this run)")
    p.add_argument("--zero-stages", type=int, nargs="+", default=None,
                   help="DeepSpeed ZeRO stages to time (default: reference.zero_stage's)")
    p.add_argument("--out", default=str(Path(__file__).parent / "results"),
                   help="folder for train_throughput_<cpu|gpu>.md")
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


if __name__ == "__main__":
    main()
