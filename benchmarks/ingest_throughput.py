"""Benchmark: the ingest stage vs Hugging Face `datasets` `map`, on MathInstruct-shaped rows.

For each size N and format (JSONL, Parquet) it writes N MathInstruct-shaped rows ({source,
instruction, output}: seeded random words, lengths like MathInstruct's, 0.5% of rows repeated so
deduplication has work) as 8 shard files, then measures in the same run:

  * the ingest stage (`run_stage(cfg, "ingest")`) on a local Ray with --cpus CPUs, Ray
    started beforehand and not timed: rows/s, tokens/s, peak RSS of the driver and of the
    busiest Ray worker process (sampled every 0.1 s);
  * the baseline a user would write: `datasets.load_dataset` + `Dataset.map(batched=True)` in
    one process (no num_proc), doing the same per-row work with the same functions (parse the
    row, apply the template, tokenize with the same tokenizer, truncate) but no deduplication
    and no reject bookkeeping: rows/s and its peak RSS (own subprocess).

    python benchmarks/ingest_throughput.py                       # 262144 and 1000000 rows
    python benchmarks/ingest_throughput.py --sizes 30000 --formats jsonl

The markdown table goes to benchmarks/results/ingest_throughput_cpu.md (and stdout).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.memwatch import PeakRSS  # noqa: E402

SHARDS = 8
DUP_FRACTION = 0.005
SOURCES = ["data/CoT/gsm_rft.json", "data/PoT/mathqa.json", "data/CoT/MATH_train.json",
           "data/PoT/gsm_gpt4.json", "data/CoT/aqua_rat.json", "data/CoT/TheoremQA.json"]
log = logging.getLogger("ingest_throughput")


def make_rows(n: int, seed: int = 0) -> Any:
    """n rows shaped like MathInstruct: instruction ~30 words, output ~60 words (log-normal),
    from a 5,000-word vocabulary with digits and symbols; the last DUP_FRACTION of the rows
    repeat earlier rows' content."""
    import pyarrow as pa

    rng = np.random.default_rng(seed)
    vocab = np.array([f"w{i}" for i in range(4000)] + [str(i) for i in range(900)]
                     + ["=", "+", "-", "*", "/", "(", ")", "$", "%", "x"] * 10)
    n_dup = int(n * DUP_FRACTION)
    n_new = n - n_dup
    ins_len = np.clip(rng.lognormal(3.3, 0.5, n_new), 5, 300).astype(int)
    out_len = np.clip(rng.lognormal(4.0, 0.6, n_new), 3, 600).astype(int)
    words = vocab[rng.integers(0, len(vocab), int(ins_len.sum() + out_len.sum()))]
    instr, outs, pos = [], [], 0
    for a, b in zip(ins_len, out_len):
        instr.append(" ".join(words[pos:pos + a]) + "?")
        outs.append(" ".join(words[pos + a:pos + a + b]) + ". The answer is 42.")
        pos += a + b
    src = [SOURCES[i] for i in rng.integers(0, len(SOURCES), n_new)]
    dup = rng.integers(0, n_new, n_dup)
    return pa.table({"source": src + [src[i] for i in dup],
                     "output": outs + [outs[i] for i in dup],
                     "instruction": instr + [instr[i] for i in dup]})


def write_data(folder: Path, n: int, fmt: str) -> Path:
    """The rows as SHARDS files of one format (reused when present)."""
    import pyarrow.parquet as pq

    done = folder / f"{fmt}_{n}"
    if (done / "_done").is_file():
        return done
    shutil.rmtree(done, ignore_errors=True)
    done.mkdir(parents=True)
    table = make_rows(n)
    step = -(-n // SHARDS)
    for i in range(SHARDS):
        part = table.slice(i * step, step)
        if fmt == "parquet":
            pq.write_table(part, done / f"part-{i:02d}.parquet")
        else:
            with (done / f"part-{i:02d}.jsonl").open("w") as f:
                for r in part.to_pylist():
                    f.write(json.dumps(r) + "\n")
    (done / "_done").write_text("ok")
    return done


def run_stage(data: Path, out: Path, tokenizer: str) -> dict[str, Any]:
    from s2l_ray.config import load_config
    from s2l_ray.stages.registry import run_stage

    shutil.rmtree(out, ignore_errors=True)
    cfg = load_config(None, [f"run.output_dir={out}", f"data.source={data}",
                             "data.format=mathinstruct", "data.template=alpaca",
                             "data.max_length=512", f"reference.model={tokenizer}",
                             "run.progress_seconds=30"])
    with PeakRSS(object_store=True) as mem:
        t0 = time.perf_counter()
        rep = run_stage(cfg, "ingest").report()
        wall = time.perf_counter() - t0
    shutil.rmtree(out, ignore_errors=True)
    return {"rows": rep["rows"], "valid": rep["valid"], "rejected": rep["rejected"],
            "tokens": rep["tokens"], "seconds": wall, "rows_per_s": rep["rows"] / wall,
            "tokens_per_s": rep["tokens"] / wall, "driver_peak_mb": mem.driver / 2**20,
            "worker_peak_mb": mem.worker_peak_mb(),
            "worker_private_peak_mb": mem.worker_private_peak_mb(),
            "store_peak_mb": mem.store / 2**20}


def baseline(data: Path, fmt: str, tokenizer: str, cache: Path) -> dict[str, Any]:
    """datasets.load_dataset + map(batched) in this process (run in a subprocess of its own),
    written as a user would: the tokenizer called through transformers on the batch's prompts
    and responses, ids concatenated and cut in Python. Its CPU time is measured too: the fast
    tokenizer runs a batch on every core (Rust threads), so "one process" is not one core."""
    import datasets
    from transformers import AutoTokenizer

    from s2l_ray.core.formats import RowError, content_id, to_example

    datasets.disable_progress_bars()
    tok = AutoTokenizer.from_pretrained(tokenizer)
    eos = tok.eos_token_id
    files = sorted(str(p) for p in data.glob(f"*.{fmt}"))

    def fn(batch: dict[str, list]) -> dict[str, list]:
        rows = [dict(zip(batch, v)) for v in zip(*batch.values())]
        exs = []
        for r in rows:
            try:
                exs.append(to_example(r, "mathinstruct", "alpaca"))
            except RowError:
                exs.append(None)
        ok = [e for e in exs if e is not None]
        p_ids = tok([e.prompt for e in ok], add_special_tokens=False)["input_ids"]
        r_ids = tok([e.response for e in ok], add_special_tokens=False)["input_ids"]
        it = iter(zip(p_ids, r_ids))
        out: dict[str, list] = {"id": [], "input_ids": [], "n_prompt_tokens": [],
                                "n_tokens": []}
        for e in exs:
            p, r = next(it) if e is not None else ([], [])
            ids = (p + r + [eos])[:512] if e is not None else []
            out["id"].append(content_id(e.content) if e is not None else None)
            out["input_ids"].append(ids)
            out["n_prompt_tokens"].append(len(p))
            out["n_tokens"].append(len(ids))
        return out

    def cpu_s() -> float:
        r = resource.getrusage(resource.RUSAGE_SELF)  # all threads of this process
        return r.ru_utime + r.ru_stime

    c0, t0 = cpu_s(), time.perf_counter()
    ds = datasets.load_dataset("json" if fmt == "jsonl" else "parquet", data_files=files,
                               split="train", cache_dir=str(cache))
    ds = ds.map(fn, batched=True, batch_size=1000, remove_columns=ds.column_names,
                load_from_cache_file=False)
    wall, cpu = time.perf_counter() - t0, cpu_s() - c0
    tokens = int(np.sum(ds["n_tokens"]))
    return {"rows": len(ds), "tokens": tokens, "seconds": wall, "rows_per_s": len(ds) / wall,
            "tokens_per_s": tokens / wall, "cpu_s": cpu, "cores_used": cpu / wall,
            "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def run_baseline(data: Path, fmt: str, tokenizer: str, work: Path) -> dict[str, Any]:
    cache = work / "hf_cache"
    shutil.rmtree(cache, ignore_errors=True)
    res = work / "baseline.json"
    subprocess.run([sys.executable, __file__, "--baseline", str(data), fmt, tokenizer,
                    str(cache), str(res)], check=True, cwd=ROOT)
    shutil.rmtree(cache, ignore_errors=True)
    return json.loads(res.read_text())


def in_subprocess(fn: Any, *args: Any) -> Any:
    import multiprocessing as mp

    with mp.get_context("spawn").Pool(1) as pool:
        return pool.apply(fn, args)


def machine() -> str:
    import psutil

    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text()
                .splitlines() if ln.startswith("model name")), platform.processor())
    return (f"{cpu}, {os.cpu_count()} cores, {psutil.virtual_memory().total / 2**30:.0f} GiB "
            f"RAM, Linux {platform.release()}, Python {platform.python_version()}")


def table(rows: list[dict[str, Any]], cpus: int) -> str:
    """The results (results.json's rows) as the markdown page."""
    lines = [
        "# Ingest throughput: the ingest stage vs `datasets` map (CPU)", "",
        f"Machine: {machine()}. Ray local with {cpus} CPUs (started before timing); the "
        "baseline is one process. Tokenizer: the offline `tiny:nano` BPE; data.max_length=512, "
        "template alpaca, format mathinstruct. Rows: MathInstruct-shaped (seeded random words, "
        f"{SHARDS} files, {DUP_FRACTION:.1%} repeated rows). Peak RSS: sampled every 0.1 s "
        "(stage) / ru_maxrss (baseline, its own process). A worker's RSS counts the "
        "object-store pages it touched (shared memory, held once by the store): its private "
        "peak is RSS minus shared pages; the object store peak is sampled every 1 s.", "",
        "| rows | format | stage s | stage rows/s | stage tokens/s | driver peak MB | "
        "worker peak MB | worker private peak MB | object store peak MB | datasets s | "
        "datasets rows/s | datasets cores used | datasets peak MB | rows/s ratio | "
        "per-core ratio |",
        "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: "
        "| ---: | ---: | ---: |"]
    for r in sorted(rows, key=lambda r: (r["n"], r["fmt"])):
        s, b, n_cpus = r["stage"], r["base"], r["cpus"]
        base = "- | - | - | - | - | -"
        if b:
            per_core = (s["rows_per_s"] / n_cpus) / (b["rows_per_s"] / b["cores_used"])
            base = (f"{b['seconds']:.1f} | {b['rows_per_s']:,.0f} | {b['cores_used']:.2f} | "
                    f"{b['peak_mb']:,.0f} | {s['rows_per_s'] / b['rows_per_s']:.2f}x | "
                    f"{per_core:.2f}x")
        mark = " (b)" if r.get("base_earlier") else ""
        extra = " | ".join(f"{s[k]:,.0f}" if s.get(k) else "-"
                           for k in ("worker_private_peak_mb", "store_peak_mb"))
        lines.append(
            f"| {r['n']:,} | {r['fmt']}{mark} | {s['seconds']:.1f} | {s['rows_per_s']:,.0f} | "
            f"{s['tokens_per_s']:,.0f} | {s['driver_peak_mb']:,.0f} | "
            f"{s['worker_peak_mb']:,.0f} | {extra} | {base} |")
    lines += ["", "rows/s ratio = stage rows/s / datasets rows/s, both on the whole machine. "
              "per-core ratio = (stage rows/s / its CPUs) / (datasets rows/s / the cores it "
              "used: its process's CPU seconds over its wall time; the fast tokenizer encodes "
              "a batch on several threads). The stage also deduplicates ids, keeps rejects with "
              "reasons and writes Parquet; the baseline does the same parsing, templating, ids "
              "and tokenization only. (b): the baseline figures come from an earlier run of "
              "this script (--keep, baseline skipped to save time), same machine and code.", ""]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="262144,1000000",
                    help="row counts to generate and ingest, comma-separated (default: "
                         "MathInstruct's 262k and 1M)")
    ap.add_argument("--formats", default="jsonl,parquet", help="input file formats to measure")
    ap.add_argument("--cpus", type=int, default=2, help="CPUs of the local Ray the stage runs on")
    ap.add_argument("--tokenizer", default="tiny:nano",
                    help="model spec whose tokenizer both sides use (tiny:* builds offline)")
    ap.add_argument("--work", default="/tmp/s2l_ingest_bench",
                    help="scratch folder: generated data, stage outputs, saved results")
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/ingest_throughput_cpu.md"),
                    help="markdown table to write")
    ap.add_argument("--baseline-max", type=int, default=10**9,
                    help="run the datasets baseline only for sizes up to this")
    ap.add_argument("--keep", action="store_true",
                    help="merge into the results of earlier runs (same --work) instead of "
                         "replacing them: the table then holds every (size, format) measured")
    ap.add_argument("--table-only", action="store_true",
                    help="only rewrite the markdown from the saved results (--work)")
    ap.add_argument("--baseline", nargs=5, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.baseline:
        data, fmt, tok, cache, res = a.baseline
        Path(res).write_text(json.dumps(baseline(Path(data), fmt, tok, Path(cache))))
        return
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    from s2l_ray.models.tiny import resolve_model
    from s2l_ray.runtime import init_ray, setup_logging

    work = Path(a.work)
    if a.table_only:
        Path(a.out).write_text(table(json.loads((work / "results.json").read_text()), a.cpus))
        return
    setup_logging()
    work.mkdir(parents=True, exist_ok=True)
    # The tiny model and the data are made in subprocesses: this process is the stage's
    # driver, and its peak RSS must be the stage's, not that of building 1M rows in memory.
    tok = in_subprocess(resolve_model, a.tokenizer, work / "models") \
        if a.tokenizer.startswith("tiny:") else a.tokenizer
    init_ray(num_cpus=a.cpus)
    saved = work / "results.json"
    rows = json.loads(saved.read_text()) if a.keep and saved.is_file() else []
    for n in (int(s) for s in a.sizes.split(",")):
        for fmt in a.formats.split(","):
            data = in_subprocess(write_data, work / "data", n, fmt)
            log.info("%d rows, %s: ingest stage", n, fmt)
            st = run_stage(data, work / "out", tok)
            log.info("%s", st)
            base = None
            if n <= a.baseline_max:
                log.info("%d rows, %s: datasets baseline", n, fmt)
                base = run_baseline(data, fmt, tok, work)
                log.info("%s", base)
            earlier = [r for r in rows if (r["n"], r["fmt"]) == (n, fmt)]
            earlier_base = None
            if base is None and earlier and earlier[0]["base"]:  # --keep, baseline skipped
                earlier_base = earlier[0]["base"]
            rows = [r for r in rows if (r["n"], r["fmt"]) != (n, fmt)]
            rows.append({"n": n, "fmt": fmt, "stage": st, "base": base or earlier_base,
                         "base_earlier": earlier_base is not None, "cpus": a.cpus})
            saved.write_text(json.dumps(rows, indent=1))
    text = table(rows, a.cpus)
    print(text)
    Path(a.out).write_text(text)


if __name__ == "__main__":
    main()
