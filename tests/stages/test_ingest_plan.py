"""How the ingest stage sizes its Ray Data pipeline (no Ray): read tasks at once, backlog cap."""

from __future__ import annotations

import pytest

from s2l_ray.io import readers
from s2l_ray.io.readers import read_concurrency
from s2l_ray.stages import ingest
from s2l_ray.stages.ingest import backlog_limit


def test_read_concurrency_grows_with_the_cluster_not_past_the_files() -> None:
    per = readers.CPUS_PER_READ
    assert per is not None and readers.READ_TASK_CPUS == 0
    assert read_concurrency(8, cluster_cpus=2) == 1  # a laptop: one file at a time
    assert read_concurrency(1000, cluster_cpus=per * 16) == 16  # a cluster: reads spread
    assert read_concurrency(1000, cluster_cpus=per * 16 + 1) == 17
    assert read_concurrency(3, cluster_cpus=per * 16) == 3  # never more than the files
    assert read_concurrency(1, cluster_cpus=0.5) == 1


def test_backlog_limit_per_cpu_with_a_floor(monkeypatch: pytest.MonkeyPatch) -> None:
    per, floor = ingest.BACKLOG_BYTES_PER_CPU, ingest.BACKLOG_MIN_BYTES
    assert per is not None and floor >= per
    assert backlog_limit(cluster_cpus=1) == floor
    assert backlog_limit(cluster_cpus=100) == 100 * per
    monkeypatch.setattr(ingest, "BACKLOG_BYTES_PER_CPU", None)
    assert backlog_limit(cluster_cpus=100) is None  # Ray Data's own budget
