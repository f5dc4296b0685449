"""Peak resident memory of a benchmark's driver and of the local Ray's worker processes, sampled
on a thread (Ray workers are descendants of the driver that started the local Ray).

A worker's RSS also counts the object-store (shared memory) pages it has touched: the blocks it
wrote or read, which live once in the store whatever the number of processes mapping them. So
each worker's private peak (RSS minus its shared pages) is kept too, and, when asked, the peak
of the object store's use (what the store holds, counted once)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any


class Sampling:
    """A thread that calls `sample()` every `every` s between `with` entry and exit; `me` is
    this process (psutil), whose descendants are the local Ray's processes."""

    def __init__(self, every: float) -> None:
        import psutil

        self.me = psutil.Process()
        self.every = every
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._loop, daemon=True)

    def sample(self) -> None:
        raise NotImplementedError

    def ray_workers(self) -> Iterator[tuple[Any, Any]]:
        """(process, memory_info) of each live Ray worker (`ray::` process) below this one."""
        import psutil

        for p in self.me.children(recursive=True):
            try:
                if p.name().startswith("ray::"):
                    yield p, p.memory_info()
            except psutil.Error:  # gone between listing and reading
                continue

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.sample()
            time.sleep(self.every)

    def __enter__(self) -> Any:
        self._t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._t.join()


class PeakRSS(Sampling):
    """Samples the RSS of this process and of every descendant (the local Ray's processes)
    every `every` s: peak of the driver, and of each Ray worker (`ray::` processes), by pid."""

    def __init__(self, every: float = 0.1, object_store: bool = False) -> None:
        super().__init__(every)
        self.driver = 0
        self.workers: dict[int, int] = {}
        self.private: dict[int, int] = {}  # RSS - shared pages, by pid
        self.object_store = object_store
        self.store = 0  # peak bytes in the local Ray's object store (sampled every 1 s)
        self._last_store = 0.0

    def sample(self) -> None:
        self.driver = max(self.driver, self.me.memory_info().rss)
        for p, mi in self.ray_workers():
            self.workers[p.pid] = max(self.workers.get(p.pid, 0), mi.rss)
            self.private[p.pid] = max(self.private.get(p.pid, 0), mi.rss - mi.shared)
        if self.object_store and time.monotonic() - self._last_store >= 1.0:
            self._last_store = time.monotonic()
            self.store = max(self.store, store_bytes())

    def worker_peak_mb(self) -> float:
        return max(self.workers.values(), default=0) / 2**20

    def worker_private_peak_mb(self) -> float:
        return max(self.private.values(), default=0) / 2**20

    def driver_peak_mb(self) -> float:
        return self.driver / 2**20


_STATES: dict[str, object] = {}  # GCS address -> Ray's GlobalState connection


def store_bytes() -> int:
    """Bytes the object store of the Ray this process is connected to holds now (0 when it
    cannot tell). The address is this process's own: on a shared machine the default lookup
    could find another user's local Ray."""
    import ray
    from ray._private.internal_api import get_memory_info_reply, get_state_from_address

    try:
        address = ray.get_runtime_context().gcs_address
        if address not in _STATES:
            _STATES[address] = get_state_from_address(address)
        return int(get_memory_info_reply(_STATES[address]).store_stats.object_store_bytes_used)
    except Exception:  # a missed sample, not a failed benchmark
        return 0
