"""Progress lines for long stages: done/total, rate and time left, at a steady cadence.

Ray-free. A stage counts its units (`add`/`set`, or a `poll` callable that reads the count from
wherever it lives, e.g. a Ray actor fed by workers); a daemon thread logs one line every `every`
seconds, so a user (or a `ray job submit` log) sees how far a run is even while no unit finishes:

    trajectories: 412,000/1,960,000 examples (21%), 9,800 ex/s, ETA 2m38s

The rate is the average since `start()` (done / elapsed): steady, and honest about start-up costs
such as model loading. `stop()` logs a last line and returns the figures a report keeps.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

DEFAULT_EVERY = 15.0  # seconds between lines: frequent enough to see motion, rare enough to read


def format_duration(seconds: float) -> str:
    """45s, 2m38s, 3h05m, 2d04h: two units at most (an ETA is not precise beyond that)."""
    if seconds != seconds or seconds < 0:  # NaN or negative
        raise ValueError(f"a duration must be >= 0, got {seconds}")
    s = round(seconds)
    if s < 60:
        return f"{s}s"
    m, s = divmod(s, 60)
    if m < 60:
        return f"{m}m{s:02d}s"
    h, m = divmod(m, 60)
    if h < 24:
        return f"{h}h{m:02d}m"
    d, h = divmod(h, 24)
    return f"{d}d{h:02d}h"


def format_count(x: float) -> str:
    """Thousands separated; fractions only where they matter (small counts and rates)."""
    if x >= 100 or float(x).is_integer():
        return f"{round(x):,}"
    return f"{x:.2f}" if x < 10 else f"{x:.1f}"


def progress_line(name: str, done: float, total: float | None, unit: str, seconds: float,
                  rate_unit: str | None = None, base: float = 0.0) -> str:
    """`name: done/total unit (pct%), rate rate_unit, ETA t`; without a total, no % and no ETA;
    before any unit is done, no rate either. `base`: units already done when the clock started
    (a resumed run): counted in done, not in the rate."""
    if seconds < 0 or done < 0:
        raise ValueError(f"done and seconds must be >= 0, got {done}, {seconds}")
    rate_unit = rate_unit or f"{unit}/s"
    text = f"{name}: {format_count(done)}"
    if total:
        text += f"/{format_count(total)} {unit} ({min(100, int(100 * done / total))}%)"
    else:
        text += f" {unit}"
    rate = max(0.0, done - base) / seconds if seconds > 0 else 0.0
    if rate > 0:
        text += f", {format_count(rate)} {rate_unit}"
        if total:
            text += f", ETA {format_duration(max(0.0, total - done) / rate)}"
    elif seconds > 0:
        text += f", {format_duration(seconds)} elapsed"
    return text


class Progress:
    """Counts units of work and logs a progress line every `every` seconds from a daemon thread
    (every <= 0: only the final line). Thread-safe; use as a context manager or start/stop."""

    def __init__(self, name: str, total: float | None = None, unit: str = "examples", *,
                 every: float = DEFAULT_EVERY, rate_unit: str | None = None,
                 poll: Callable[[], float | None] | None = None,
                 logger: logging.Logger | None = None, base: float = 0.0,
                 detail: Callable[[], str] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.name, self.total, self.unit, self.rate_unit = name, total, unit, rate_unit
        self.base = base  # units done before start() (a resumed run): not part of the rate
        self.detail = detail  # appended to each line, e.g. the state of each sweep trial
        self.every, self.poll, self.clock = every, poll, clock
        self.log = logger or logging.getLogger("s2l_ray.progress")
        self.done = float(base)
        self.lines = 0  # progress lines logged, the final one included
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._t0: float | None = None
        self._t1: float | None = None

    def add(self, n: float = 1) -> None:
        with self._lock:
            self.done += n

    def set(self, done: float) -> None:
        with self._lock:
            self.done = done

    def elapsed(self) -> float:
        if self._t0 is None:
            return 0.0
        return (self._t1 if self._t1 is not None else self.clock()) - self._t0

    def line(self) -> str:
        text = progress_line(self.name, self.done, self.total, self.unit, self.elapsed(),
                             self.rate_unit, self.base)
        if self.detail is not None:
            try:
                extra = self.detail()
            except Exception as e:  # never fail the stage for a progress line
                extra = f"({type(e).__name__})"
            text += f"; {extra}" if extra else ""
        return text

    def start(self) -> Progress:
        self._t0, self._t1 = self.clock(), None
        if self.every > 0:
            self._thread = threading.Thread(target=self._loop, name=f"progress-{self.name}",
                                            daemon=True)
            self._thread.start()
        return self

    def _refresh(self) -> None:
        if self.poll is None:
            return
        try:
            got = self.poll()
        except Exception as e:  # a progress line must never fail the stage it watches
            self.log.debug("%s: progress poll failed: %s", self.name, e)
            return
        if got is not None:
            self.set(got)

    def _emit(self) -> None:
        self.lines += 1
        self.log.info("%s", self.line())

    def _loop(self) -> None:
        while not self._stop.wait(self.every):
            self._refresh()
            self._emit()

    def stop(self) -> dict[str, Any]:
        """End the periodic lines, log the last one; returns {done, seconds, per_s} (per_s:
        the units done since start, per second)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._t0 is not None and self._t1 is None:
            self._refresh()
            self._t1 = self.clock()
            self._emit()
        seconds = self.elapsed()
        return {"done": self.done, "seconds": seconds,
                "per_s": (self.done - self.base) / seconds if seconds > 0 else None}

    def __enter__(self) -> Progress:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
