"""Helpers for tests that run Ray in other processes (a `ray start` head, a pipeline run in a
subprocess, a multi-node Cluster): free ports, short temp dirs, and cleanup that ends only the
processes of that one Ray. `ray stop` is not an option: it ends every Ray on the machine,
including the session's `ray_local` and other test runs."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
from contextlib import ExitStack, suppress
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def free_ports(n: int) -> list[int]:
    """n distinct TCP ports free right now on 127.0.0.1."""
    with ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(n)]
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]


def short_tmpdir(prefix: str) -> Path:
    """A fresh folder under /tmp: Ray puts unix sockets in its temp dir, and their paths must
    stay under ~107 characters (pytest's tmp_path can be longer)."""
    return Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))


def processes_of(marker: str, roots: tuple[int, ...] = ()) -> list:
    """The processes whose command line names `marker` (a Ray temp dir), the processes with
    pid in `roots`, and all their descendants. Ray workers rename themselves (ray::...) and
    lose the marker, but stay children of their raylet, which keeps it."""
    import psutil

    found: dict[int, psutil.Process] = {}
    for p in psutil.process_iter(["cmdline"]):
        try:
            if p.pid == os.getpid():
                continue
            if p.pid in roots or any(marker in a for a in p.info["cmdline"] or ()):
                found[p.pid] = p
                found.update((c.pid, c) for c in p.children(recursive=True))
        except psutil.Error:
            continue
    return list(found.values())


def kill_processes(procs: list) -> None:
    """SIGKILL these processes (psutil checks each is still the same process) and reap them."""
    import psutil

    for p in procs:
        with suppress(psutil.Error):
            p.kill()
    psutil.wait_procs(procs, timeout=15)


def kill_run(proc: subprocess.Popen, marker: str) -> None:
    """End a pipeline run started with start_new_session=True and its private Ray. The group is
    frozen (SIGSTOP) at once, so the run cannot get further while the process tree is listed
    (once the driver dies its children are reparented and untraceable); then the group and the
    tree are SIGKILLed, then whatever is left of that Ray (by its temp dir)."""
    if proc.poll() is None:
        with suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGSTOP)
    tree = processes_of(marker, roots=(proc.pid,))
    if proc.poll() is None:
        with suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    kill_processes(tree)
    kill_processes(processes_of(marker))


def ray_cli() -> str:
    return str(Path(sys.executable).parent / "ray")


def clean_env(**extra: str) -> dict[str, str]:
    """This environment without RAY_ADDRESS (the child must not join another Ray)."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(extra)
    return env
