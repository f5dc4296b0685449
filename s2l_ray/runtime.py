"""Process-level plumbing: logging and joining (or starting) Ray."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Iterator
from typing import Any

from s2l_ray.redaction import REDACTED, redact

log = logging.getLogger("s2l_ray")
__all__ = ["REDACTED", "RedactSecrets", "init_ray", "redact", "setup_logging"]


def redact_record(record: logging.LogRecord) -> None:
    """Apply `redact` to a record's message and traceback, in place."""
    message = record.getMessage()
    clean = redact(message)
    if clean != message:
        record.msg, record.args = clean, None
    if record.exc_info and not record.exc_text:
        record.exc_text = logging.Formatter().formatException(record.exc_info)
    if record.exc_text:
        record.exc_text = redact(record.exc_text)
    if record.stack_info:
        record.stack_info = redact(record.stack_info)


class RedactSecrets(logging.Filter):
    """Rewrites each record it sees with `redact` applied to the message and traceback. The
    record object itself is changed, so handlers after ours (the root's, pytest's) get the
    redacted text too."""

    def filter(self, record: logging.LogRecord) -> bool:
        redact_record(record)
        return True


def _install_record_factory() -> None:
    """Redact every record when it is made, whichever logger (ray, pyarrow, transformers, the
    root) and whichever handler (added before or after this call) writes it."""
    old = logging.getLogRecordFactory()
    if getattr(old, "s2l_redacts", False):
        return

    def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = old(*args, **kwargs)
        redact_record(record)
        return record

    factory.s2l_redacts = True  # type: ignore[attr-defined]
    logging.setLogRecordFactory(factory)


def setup_logging(level: str = "INFO") -> None:
    root = logging.getLogger("s2l_ray")
    if not root.handlers:
        h = logging.StreamHandler(sys.stderr)
        h.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s",
                                         "%H:%M:%S"))
        root.addHandler(h)
    _install_record_factory()
    # On the handlers, not the loggers: a logger's own filters skip records from its children
    # (s2l_ray.stages.ingest, ...), a handler's see every record it is about to write. The
    # root logger's handlers too, which write other libraries' records.
    for h in [*root.handlers, *logging.getLogger().handlers]:
        if not any(isinstance(f, RedactSecrets) for f in h.filters):
            h.addFilter(RedactSecrets())
    root.setLevel(level.upper())


# A local Ray serves only this machine: everything it lets us bind goes to 127.0.0.1.
# - the dashboard (it also serves the state API that Ray Train's controller relies on, and the
#   job server): dashboard_host;
# - everything else follows the node's IP: with the IP 127.0.0.1, Ray's C++ servers (GCS,
#   raylet, object manager, every worker's and the driver's gRPC server) listen on 127.0.0.1
#   instead of all interfaces, and so do its agents (dashboard agent gRPC/HTTP, its Prometheus
#   metrics page, runtime-env agent) and the dashboard's and autoscaler monitor's metrics
#   servers. ray.init's `_node_ip_address` sets it, see `_loopback_node_ip` for why that alone
#   is not enough.
LOCAL_RAY_LOOPBACK: dict[str, Any] = {"include_dashboard": True, "dashboard_host": "127.0.0.1",
                                      "_node_ip_address": "127.0.0.1"}


@contextlib.contextmanager
def _loopback_node_ip() -> Iterator[None]:
    """While starting a local Ray: let the node IP really be 127.0.0.1. ray.init "resolves" a
    loopback `_node_ip_address` to the machine's routable IP unless Ray believes clusters are
    disabled (its macOS/Windows mode, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0), the one switch Ray
    has for a loopback-only node. Set for this process's already imported constant and, for
    the processes ray.init starts, in the environment; both restored afterwards, so `ray start`
    run later from here behaves as usual."""
    from ray._private import ray_constants

    name = ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR
    old_env, old_flag = os.environ.get(name), ray_constants.ENABLE_RAY_CLUSTER
    os.environ[name], ray_constants.ENABLE_RAY_CLUSTER = "0", False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = old_flag
        if old_env is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old_env


def init_ray(address: str | None = None, num_cpus: int | None = None) -> Any:
    """Join a running cluster (address, or RAY_ADDRESS) or start a private local Ray.

    A local Ray listens on 127.0.0.1 only (LOCAL_RAY_LOOPBACK), so nothing is reachable from
    beyond this machine.
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
        with _loopback_node_ip():
            ray.init(num_cpus=num_cpus, runtime_env=env, **LOCAL_RAY_LOOPBACK)
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
