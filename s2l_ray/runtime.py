"""Process-level plumbing: logging and joining (or starting) Ray."""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

log = logging.getLogger("s2l_ray")


def setup_logging(level: str = "INFO") -> None:
    root = logging.getLogger("s2l_ray")
    if not root.handlers:
        h = logging.StreamHandler(sys.stderr)
        h.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s",
                                         "%H:%M:%S"))
        root.addHandler(h)
    root.setLevel(level.upper())


def init_ray(address: str | None = None, num_cpus: int | None = None) -> Any:
    """Join a running cluster (address, or RAY_ADDRESS) or start a private local Ray.

    A local Ray keeps its dashboard on 127.0.0.1 so nothing listens beyond this machine.
    """
    import ray

    if ray.is_initialized():
        return ray
    address = address or os.environ.get("RAY_ADDRESS")
    # Workers must import s2l_ray even when it runs from a source checkout (python -m s2l_ray).
    src = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {"env_vars": {"PYTHONPATH": os.pathsep.join(
        p for p in (src, os.environ.get("PYTHONPATH", "")) if p)}}
    if address:
        # A job submitted with --working-dir already ships the code; don't add a runtime_env.
        log.info("joining Ray cluster at %s", address)
        ray.init(address=address)
    else:
        log.info("starting a local Ray (num_cpus=%s)", num_cpus or "all")
        # The dashboard process also serves the state API that Ray Train's controller relies on;
        # bound to 127.0.0.1 so nothing listens beyond this machine.
        ray.init(num_cpus=num_cpus, include_dashboard=True, dashboard_host="127.0.0.1",
                 runtime_env=env)
    quiet_ray_data()
    return ray


def quiet_ray_data() -> None:
    """Ray Data's per-operator progress logs drown the stage's own; keep bars for terminals."""
    from ray.data import DataContext

    ctx = DataContext.get_current()
    ctx.enable_progress_bars = sys.stderr.isatty()
    ctx.print_on_execution_start = False
    if not logging.getLogger("s2l_ray").isEnabledFor(logging.DEBUG):
        logging.getLogger("ray.data").setLevel(logging.WARNING)


def cluster_has_gpus() -> bool:
    import ray

    return ray.cluster_resources().get("GPU", 0) > 0
