"""Peak resident memory of a benchmark's driver and of the local Ray's worker processes, sampled
on a thread (Ray workers are descendants of the driver that started the local Ray)."""

from __future__ import annotations

import threading
import time


class PeakRSS:
    """Samples the RSS of this process and of every descendant (the local Ray's processes)
    every `every` s: peak of the driver, and of each Ray worker (`ray::` processes), by pid."""

    def __init__(self, every: float = 0.1) -> None:
        import psutil

        self.me = psutil.Process()
        self.every = every
        self.driver = 0
        self.workers: dict[int, int] = {}
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        import psutil

        while not self._stop.is_set():
            self.driver = max(self.driver, self.me.memory_info().rss)
            for p in self.me.children(recursive=True):
                try:
                    if p.name().startswith("ray::"):
                        self.workers[p.pid] = max(self.workers.get(p.pid, 0),
                                                  p.memory_info().rss)
                except psutil.Error:
                    continue
            time.sleep(self.every)

    def worker_peak_mb(self) -> float:
        return max(self.workers.values(), default=0) / 2**20

    def driver_peak_mb(self) -> float:
        return self.driver / 2**20

    def __enter__(self) -> PeakRSS:
        self._t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._t.join()
