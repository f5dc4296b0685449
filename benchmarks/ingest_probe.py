"""Probe: where the ingest stage's time and worker memory go (a diagnostic, not a benchmark).

Runs the ingest stage once per variant (rows per range, see VARIANTS), each on a fresh local
Ray (2 CPUs), and samples every 0.25 s: each Ray worker's RSS split into private (RSS - shared)
and shared pages (object-store pages a worker has touched count in its RSS), and the object
store's use (plasma bytes). From Ray's task timeline it tells when each task ran (a file range's
task parses and normalizes it), how many ran at once, and the rows delivered over time.

    python benchmarks/ingest_probe.py --data /tmp/s2l_ingest_bench/data/jsonl_262144 \
        --variants ranges,ranges4k
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
log = logging.getLogger("ingest_probe")

from benchmarks.memwatch import Sampling, store_bytes  # noqa: E402


class Sampler(Sampling):
    """Every `every` s, a snapshot: the driver's RSS and each Ray worker's (name, RSS, shared,
    USS; USS every 4th snapshot, it is slow to read), and every 4th one the object store's MB."""

    def __init__(self, every: float = 0.25) -> None:
        super().__init__(every)
        self.rows: list[dict[str, Any]] = []
        self.t0 = time.perf_counter()

    def sample(self) -> None:
        import psutil

        n = len(self.rows)
        snap: dict[str, Any] = {"t": time.perf_counter() - self.t0,
                                "driver": self.me.memory_info().rss / 2**20, "w": {}}
        for p, mi in self.ray_workers():
            try:
                uss = p.memory_full_info().uss / 2**20 if n % 4 == 0 else 0.0
                snap["w"][p.pid] = (p.name(), mi.rss / 2**20, mi.shared / 2**20, uss)
            except psutil.Error:  # gone since it was listed
                continue
        if n % 4 == 0:
            snap["plasma"] = store_bytes() / 2**20
        self.rows.append(snap)


def timeline(t_start_wall: float) -> list[dict[str, Any]]:
    """Ray Data's read and map tasks of this run: name, start and end (s after t_start_wall),
    worker pid, from Ray's state API."""
    from ray.util.state import list_tasks

    out: list[dict[str, Any]] = []
    try:
        tasks = list_tasks(detail=True, limit=10000, raise_on_missing_output=False)
    except Exception as e:  # a probe: report without the timeline
        log.warning("no task timeline: %s", e)
        return out
    for t in tasks:
        name = t.name or ""
        if not t.start_time_ms or not t.end_time_ms:
            continue
        if not any(k in name for k in ("Read", "MapBatches", "normalize", "_range_task")):
            continue
        out.append({"name": name, "start": t.start_time_ms / 1e3 - t_start_wall,
                    "end": t.end_time_ms / 1e3 - t_start_wall, "pid": t.worker_pid})
    return out


# rows per range (one task's work, ingest.ROWS_PER_PART) per variant; `_tok1`: the tokenizer on
# one thread (TOKENIZERS_PARALLELISM=false in the workers)
VARIANTS: dict[str, int] = {"ranges": 8192, "ranges4k": 4096, "ranges16k": 16384,
                            "ranges_tok1": 8192}


def run_variant(name: str, data: Path, work: Path, tok: str, cpus: int) -> dict[str, Any]:
    import ray

    from s2l_ray.config import load_config
    from s2l_ray.runtime import init_ray
    from s2l_ray.stages import ingest
    from s2l_ray.stages.registry import run_stage

    ingest.ROWS_PER_PART = VARIANTS[name]
    # workers inherit the environment of the local Ray this process starts
    os.environ.pop("TOKENIZERS_PARALLELISM", None)
    if name.endswith("_tok1"):
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
    init_ray(num_cpus=cpus)
    time.sleep(3)
    out = work / f"out_{name}"
    shutil.rmtree(out, ignore_errors=True)
    cfg = load_config(None, [f"run.output_dir={out}", f"data.source={data}",
                             "data.format=mathinstruct", "data.template=alpaca",
                             "data.max_length=512", f"reference.model={tok}",
                             "run.progress_seconds=10"])
    with Sampler() as s:
        t_wall = time.time()
        t0 = time.perf_counter()
        rep = run_stage(cfg, "ingest").report()
        wall = time.perf_counter() - t0
    time.sleep(2)
    tl = timeline(t_wall)
    ray.shutdown()
    shutil.rmtree(out, ignore_errors=True)
    peaks: dict[int, dict[str, Any]] = {}
    for snap in s.rows:
        for pid, (pname, rss, sh, uss) in snap["w"].items():
            p = peaks.setdefault(pid, {"name": pname, "rss": 0.0, "private": 0.0, "shared": 0.0,
                                       "uss": 0.0})
            p["rss"], p["private"] = max(p["rss"], rss), max(p["private"], rss - sh)
            p["shared"], p["uss"] = max(p["shared"], sh), max(p["uss"], uss)
    plasma = [(round(x["t"]), x["plasma"]) for x in s.rows if x.get("plasma") is not None]
    kinds: dict[str, list[dict[str, Any]]] = {}
    for e in tl:  # a file range's task parses and normalizes; an HF data set: read, then map
        kind = ("range" if "_range_task" in e["name"] else "read" if "Read" in e["name"]
                else "normalize")
        kinds.setdefault(kind, []).append(e)
    summary = {k: {"n": len(v), "first_start": min(e["start"] for e in v),
                   "last_end": max(e["end"] for e in v),
                   "busy_s": sum(e["end"] - e["start"] for e in v),
                   "processes": len({e["pid"] for e in v})} for k, v in kinds.items()}
    # tasks running at once, per 5 s bin (seconds of task time in the bin / 5)
    bins = []
    for b in range(0, int(wall) + 5, 5):
        row = {"t": b}
        for k, v in kinds.items():
            row[k] = round(sum(max(0.0, min(e["end"], b + 5) - max(e["start"], b))
                               for e in v) / 5, 2)
        bins.append(row)
    return {"variant": name, "seconds": wall, "rows": rep["rows"], "rows_per_s": rep["rows"] / wall,
            "driver_peak_mb": max(x["driver"] for x in s.rows),
            "workers": sorted(peaks.values(), key=lambda p: -p["rss"])[:6],
            "plasma_peak_mb": max((p for _, p in plasma), default=None),
            "plasma": plasma[::2], "tasks": summary, "concurrency": bins,
            "names": sorted({e["name"] for e in tl})}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True)
    ap.add_argument("--variants", default="ranges", help=f"comma-separated: {', '.join(VARIANTS)}")
    ap.add_argument("--cpus", type=int, default=2)
    ap.add_argument("--tokenizer", default="/tmp/s2l_ingest_bench/models/tiny-nano-68bce3b6e4")
    ap.add_argument("--work", default="/tmp/h14c_probe")
    a = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    from s2l_ray.runtime import setup_logging

    setup_logging()
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    for name in a.variants.split(","):
        res = run_variant(name, Path(a.data), work, a.tokenizer, a.cpus)
        (work / f"{name}.json").write_text(json.dumps(res, indent=1))
        print(json.dumps({k: v for k, v in res.items() if k not in ("plasma",)}, indent=1))
        print("plasma MiB over time:", res["plasma"])


if __name__ == "__main__":
    main()
