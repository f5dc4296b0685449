"""Wall time of `s2l demo` from a cold start, and what it prints: benchmarks/results/demo_cpu.md.

Cold start: a fresh output folder and an empty model cache (S2L_RAY_CACHE), so the tiny
tokenizer, the tiny models and the pre-trained `tiny-pre:*` targets are built inside the timed
run, as on a new user's first `s2l demo`. The install is not timed. Each stage's share is read
from the timestamps of the demo's own log lines.

    python benchmarks/demo_cpu.py [--out benchmarks/results/demo_cpu.md] [key=value ...]

Run it with nothing else on the machine (on a shared machine: under the CPU lock).
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

# (label, regex of the first log line of that part of the run)
MARKS = [
    ("start Ray", r"starting a local Ray"),
    ("ingest (tokenizer, pre-trained reference built here)", r"stage ingest|ingest:|building tiny"),
    ("train-ref", r"reference: \d+ examples"),
    ("trajectories", r"trajectories"),
    ("cluster", r"cluster"),
    ("sweep (target pre-training, 5 fine-tunes + evaluations)", r"sweep: \d+ trials|pre-training"
     r" tiny-pre:small"),
    ("report", r"report: wrote"),
]


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _seconds(stamp: str) -> int:
    h, m, s = map(int, stamp.split(":"))
    return h * 3600 + m * 60 + s


def stage_times(log: str) -> list[tuple[str, int]]:
    """(label, seconds from its first log line to the next part's), from HH:MM:SS stamps."""
    lines = [(m[1], m[2]) for m in re.finditer(r"^(\d\d:\d\d:\d\d) \w+ (.*)$", log, re.M)]
    starts = []
    for label, pattern in MARKS:
        hit = next((_seconds(t) for t, msg in lines if re.search(pattern, msg)), None)
        if hit is not None:
            starts.append((label, hit))
    starts.sort(key=lambda x: x[1])
    end = _seconds(lines[-1][0]) if lines else 0
    return [(label, (starts[i + 1][1] if i + 1 < len(starts) else end) - t)
            for i, (label, t) in enumerate(starts)]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results/demo_cpu.md")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="s2l-demo-bench-") as tmp:
        env = {**os.environ, "S2L_RAY_CACHE": str(Path(tmp) / "cache")}
        cmd = [sys.executable, "-m", "s2l_ray", "demo", f"run.output_dir={tmp}/demo",
               *args.overrides]
        t0 = time.time()
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        wall = time.time() - t0
        sys.stderr.write(proc.stderr[-3000:])
        if proc.returncode:
            sys.stdout.write(proc.stdout)
            return proc.returncode
    # Ray echoes its workers' lines to stdout too: the demo's own last words start at its table.
    out = proc.stdout
    table = out[out.rfind("## Result"):].split("\nPlots and the full table")[0].strip()
    parts = "\n".join(f"| {label} | {sec} |" for label, sec in stage_times(proc.stderr))
    text = f"""# `s2l demo` on a CPU laptop, cold start

Machine: {_cpu_name()}, {os.cpu_count()} cores, no GPU; {platform.system()} {platform.release()},
Python {platform.python_version()}. Measured {datetime.now().strftime('%Y-%m-%d %H:%M')} with
`python benchmarks/demo_cpu.py {' '.join(args.overrides)}` (fresh output folder, empty model
cache `S2L_RAY_CACHE`: the tokenizer, the tiny models and the short pre-training of the
`tiny-pre:*` models are inside the time; the install is not).

**Wall time: {wall:.0f} s ({wall / 60:.1f} min).**

| part of the run (from its first log line) | seconds |
| --- | --- |
{parts}

What the demo printed at the end:

{table}
"""
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
