"""Run by tests/e2e/test_fault_tolerance.py in a process of its own, because it needs a multi-node
Ray (`ray.cluster_utils.Cluster`) and the test session already holds `ray_local`.

    python tests/fault_tolerance_run.py CONFIG.yaml RESULT.json

A head with no CPUs (so every task and model actor runs on a worker node) and two worker nodes
with 3 CPUs each: after one is lost, the survivor holds both 1-CPU scorer actors and still has a
CPU for the data tasks (the headroom the stage checks for at its start; with less, the restarted
actor takes the last CPU and the writes wait forever). The trajectory stage runs with its inputs
already in run.output_dir. Once the first scored group is written, the worker node hosting a
live TrajectoryScorer actor is killed (its processes SIGKILLed, no graceful shutdown).
RESULT.json records when and what was killed and the stage's report, or the error.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any

log = logging.getLogger("s2l_ray.fault_tolerance_run")
SCORER = "TrajectoryScorer"
SCORING_CPU_S = 0.2  # an idle actor uses far less; scoring one group of blocks, about this


def _rows(files: list[Path]) -> int:
    """Rows in the scored files written so far (one still being written counts 0)."""
    import pyarrow.parquet as pq

    total = 0
    for f in files:
        with contextlib.suppress(OSError, ValueError):
            total += pq.read_metadata(f).num_rows
    return total


def _cpu_seconds(pid: int) -> float:
    import psutil

    try:
        t = psutil.Process(pid).cpu_times()
        return t.user + t.system
    except psutil.Error:
        return 0.0


def _kill_a_scoring_node(cluster: Any, out: Path, info: dict[str, Any],
                         timeout: float = 600) -> None:
    """Kill the worker node of a scorer actor once scoring is under way: a scored file is
    written, or an actor has computed for SCORING_CPU_S since it came up (its models are loaded
    by then; waiting for a file alone can miss the stage when the writes lag the scoring)."""
    from ray._private import state

    tmp, done = out / ".trajectories.tmp", out / "trajectories" / "_SUCCESS.json"
    idle_cpu: dict[int, float] = {}  # scorer pid -> CPU seconds when first seen alive
    deadline = time.time() + timeout
    while time.time() < deadline:
        if done.exists():
            info["error"] = "the stage finished before any node was killed"
            return
        alive = [a for a in state.actors(actor_state_name="ALIVE").values()
                 if SCORER in a["ActorClassName"]]
        busy = False
        for a in alive:
            cpu = _cpu_seconds(a["Pid"])
            busy |= cpu - idle_cpu.setdefault(a["Pid"], cpu) >= SCORING_CPU_S
        written = list(tmp.glob("*.parquet")) if tmp.is_dir() else []
        nodes = {a["Address"]["NodeID"] for a in alive}
        victim = next((n for n in cluster.worker_nodes if n.node_id in nodes), None)
        if (written or busy) and victim is not None:
            info.update(files_at_kill=len(written), rows_at_kill=_rows(written),
                        scorers_alive=len(alive),
                        scorers_on_victim=sum(a["Address"]["NodeID"] == victim.node_id
                                              for a in alive))
            log.info("killing worker node %s (%d of %d scorer actors, %d files written)",
                     victim.node_id[:8], info["scorers_on_victim"], len(alive), len(written))
            cluster.remove_node(victim, allow_graceful=False)
            info["killed"] = True
            info["marker_at_kill"] = done.exists()
            return
        time.sleep(0.05)
    info["error"] = "scoring did not start in time"


def main(cfg_path: str, result_path: str) -> int:
    import ray
    from ray.cluster_utils import Cluster

    from s2l_ray.config import load_config
    from s2l_ray.runtime import quiet_ray_data, setup_logging
    from s2l_ray.stages.registry import run_stage

    setup_logging()
    cfg = load_config(cfg_path, [])
    out = Path(cfg.run.output_dir)
    info: dict[str, Any] = {"killed": False}
    cluster = Cluster(initialize_head=True,
                      head_node_args={"num_cpus": 0, "include_dashboard": False})
    try:
        for _ in range(2):
            cluster.add_node(num_cpus=3, object_store_memory=200 * 2**20)
        cluster.wait_for_nodes()
        cluster.connect()
        quiet_ray_data()
        killer = threading.Thread(target=_kill_a_scoring_node, args=(cluster, out, info),
                                  daemon=True)
        killer.start()
        try:
            stage = run_stage(cfg, "trajectories")
            info["report"] = stage.report()
        except Exception:
            info["error"] = traceback.format_exc()
        killer.join(timeout=5)
    finally:
        Path(result_path).write_text(json.dumps(info, indent=2, default=str))
        ray.shutdown()  # the driver first: Cluster refuses to remove the node it is attached to
        cluster.shutdown()
    return 0 if "report" in info else 1


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
