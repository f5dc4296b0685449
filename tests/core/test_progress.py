"""core.progress: the line's numbers (done/total, %, rate, ETA) and the periodic thread."""

from __future__ import annotations

import logging
import time

import pytest

from s2l_ray.core.progress import Progress, format_count, format_duration, progress_line


def test_durations_and_counts() -> None:
    assert [format_duration(s) for s in (0, 44.6, 60, 158, 3600 + 5 * 60 + 29, 2 * 86400 + 4 * 3600)
            ] == ["0s", "45s", "1m00s", "2m38s", "1h05m", "2d04h"]
    with pytest.raises(ValueError):
        format_duration(-1)
    with pytest.raises(ValueError):
        format_duration(float("nan"))
    assert [format_count(x) for x in (412_000, 9_800.4, 3.14159, 42.25, 7)] == \
        ["412,000", "9,800", "3.14", "42.2", "7"]


def test_line_rate_and_eta() -> None:
    # 412,000 of 1,960,000 in 42.04 s: 9,800 ex/s, 1,548,000 left -> 158 s
    assert progress_line("trajectories", 412_000, 1_960_000, "examples", 412_000 / 9_800,
                         "ex/s") == \
        "trajectories: 412,000/1,960,000 examples (21%), 9,800 ex/s, ETA 2m38s"
    assert progress_line("ingest", 5_000, None, "rows", 2.0) == "ingest: 5,000 rows, 2,500 rows/s"
    assert progress_line("cluster", 0, 20, "iterations", 3.0) == \
        "cluster: 0/20 iterations (0%), 3s elapsed"
    assert progress_line("x", 10, 10, "steps", 5.0).endswith("(100%), 2 steps/s, ETA 0s")
    # a resumed run: 60 of 100 steps were done before; 20 more in 10 s -> 2/s, 10 s left
    assert progress_line("train-ref", 80, 100, "steps", 10.0, base=60) == \
        "train-ref: 80/100 steps (80%), 2 steps/s, ETA 10s"
    with pytest.raises(ValueError):
        progress_line("x", -1, 10, "steps", 1.0)


def test_lines_at_the_cadence(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="s2l_ray")
    seen = iter(range(0, 10**6, 7))
    p = Progress("demo", 1000, "rows", every=0.05, poll=lambda: next(seen),
                 logger=logging.getLogger("s2l_ray.test"))
    with p:
        time.sleep(0.5)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("demo: ")]
    assert p.lines == len(lines) >= 4  # periodic lines plus the final one
    assert all("/1,000 rows (" in line for line in lines)
    assert "rows/s, ETA" in lines[-1]
    summary = p.stop()  # stopping twice is harmless and logs nothing more
    assert p.lines == len(lines) and summary["done"] == p.done and summary["per_s"] > 0


def test_no_periodic_lines_when_off_and_failing_polls_ignored(
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="s2l_ray")

    def broken() -> float:
        raise ConnectionError("sink gone")

    p = Progress("quiet", 10, every=0, poll=broken, logger=logging.getLogger("s2l_ray.test"))
    p.start()
    p.add(4)
    time.sleep(0.05)
    out = p.stop()
    assert p.lines == 1 and out["done"] == 4
    assert [r.getMessage() for r in caplog.records][-1].startswith("quiet: 4/10 examples (40%)")
