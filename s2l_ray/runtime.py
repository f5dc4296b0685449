"""Process-level plumbing: logging and joining (or starting) Ray."""

from __future__ import annotations

import logging
import os
import re
import sys
from typing import Any

log = logging.getLogger("s2l_ray")


_SECRET_NAME = re.compile(r"TOKEN|SECRET|PASSWORD|KEY", re.IGNORECASE)
_HF_TOKEN = re.compile(r"hf_[A-Za-z0-9]{20,}")
REDACTED = "[REDACTED]"


def redact(text: str) -> str:
    """`text` with the values of secret-looking environment variables (names containing TOKEN,
    SECRET, PASSWORD or KEY; values of 8+ characters, shorter ones would hit ordinary words)
    and Hugging Face tokens (hf_...) replaced by [REDACTED]."""
    # Read at each call: a token exported after logging was set up is still hidden.
    values = {v for k, v in os.environ.items() if _SECRET_NAME.search(k) and len(v) >= 8}
    for v in sorted(values, key=len, reverse=True):  # longest first: no half-hidden overlaps
        text = text.replace(v, REDACTED)
    return _HF_TOKEN.sub(REDACTED, text)


class RedactSecrets(logging.Filter):
    """Rewrites each record it sees with `redact` applied to the message and traceback. The
    record object itself is changed, so handlers after ours (the root's, pytest's) get the
    redacted text too."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        clean = redact(message)
        if clean != message:
            record.msg, record.args = clean, None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        return True


def setup_logging(level: str = "INFO") -> None:
    root = logging.getLogger("s2l_ray")
    if not root.handlers:
        h = logging.StreamHandler(sys.stderr)
        h.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s",
                                         "%H:%M:%S"))
        root.addHandler(h)
    # On the handlers, not the logger: a logger's own filters skip records from its children
    # (s2l_ray.stages.ingest, ...), a handler's see every record it is about to write.
    for h in root.handlers:
        if not any(isinstance(f, RedactSecrets) for f in h.filters):
            h.addFilter(RedactSecrets())
    root.setLevel(level.upper())


def init_ray(address: str | None = None, num_cpus: int | None = None) -> Any:
    """Join a running cluster (address, or RAY_ADDRESS) or start a private local Ray.

    A local Ray keeps its dashboard on 127.0.0.1 so nothing listens beyond this machine.
    """
    import ray

    if ray.is_initialized():
        return ray
    key = "run.ray_address" if address else "RAY_ADDRESS"
    # 'auto' itself prefers RAY_ADDRESS (set by `ray job submit`), else the cluster `ray start`
    # recorded on this machine; an empty RAY_ADDRESS counts as unset, as in Ray.
    address = address or os.environ.get("RAY_ADDRESS") or None
    # Workers must import s2l_ray even when it runs from a source checkout (python -m s2l_ray).
    src = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {"env_vars": {"PYTHONPATH": os.pathsep.join(
        p for p in (src, os.environ.get("PYTHONPATH", "")) if p)}}
    if address:
        # A job submitted with --working-dir already ships the code; don't add a runtime_env.
        log.info("joining Ray cluster at %s", address)
        try:
            ray.init(address=address)
        except ConnectionError as e:
            from s2l_ray.config import ConfigError

            raise ConfigError(
                f"{key} is '{address}' but no Ray cluster answers there ({e}). Fix: start one "
                "(`ray start --head`), correct the address, or unset both run.ray_address and "
                "RAY_ADDRESS to start a local Ray") from e
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


def check_cpu_headroom(count: int, cpus_each: float, cpus_key: str, count_key: str,
                       what: str, leave: float = 1.0) -> float:
    """`count` workers or actors of `cpus_each` CPUs must leave `leave` of the Ray cluster's
    CPUs free (Ray Data reads and shuffles with them), or they would wait forever for CPUs
    that never free up. Returns the cluster's CPU count; raises a ConfigError naming the keys."""
    import ray

    from s2l_ray.config import ConfigError

    total = ray.cluster_resources().get("CPU", 0)
    need = count * cpus_each
    if total - need < leave - 1e-9:
        short = (f"leave less than {leave:g} of the cluster's {total:g} CPUs for reading the "
                 "data" if leave else f"exceed the cluster's {total:g} CPUs")
        raise ConfigError(
            f"config key '{cpus_key}': {count} {what} x {cpus_each:g} CPU {short}, and the "
            f"stage would wait forever", fix=f"lower {cpus_key} (e.g. 0.5) or {count_key}, "
            "or add CPUs")
    return total


def cluster_has_gpus() -> bool:
    import ray

    return ray.cluster_resources().get("GPU", 0) > 0
