"""How the ingest stage sizes its Ray Data pipeline (no Ray): read tasks at once, backlog cap."""

from __future__ import annotations

import pytest

from s2l_ray.io import readers
from s2l_ray.io.readers import read_concurrency
from s2l_ray.stages import ingest
from s2l_ray.stages.ingest import backlog_limit


def test_read_concurrency_grows_with_the_cluster_not_past_the_files(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(readers, "CPUS_PER_READ", 8.0)
    assert read_concurrency(8, cluster_cpus=2) == 1  # a laptop: one file at a time
    assert read_concurrency(1000, cluster_cpus=128) == 16  # a cluster: reads spread
    assert read_concurrency(1000, cluster_cpus=129) == 17
    assert read_concurrency(3, cluster_cpus=128) == 3  # never more than the files
    assert read_concurrency(1, cluster_cpus=0.5) == 1
    monkeypatch.setattr(readers, "CPUS_PER_READ", None)
    assert read_concurrency(1000, cluster_cpus=128) is None  # Ray Data decides


def test_backlog_limit_per_cpu_with_a_floor(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ingest, "BACKLOG_BYTES_PER_CPU", 64 << 20)
    monkeypatch.setattr(ingest, "BACKLOG_MIN_BYTES", 256 << 20)
    assert backlog_limit(cluster_cpus=1) == 256 << 20
    assert backlog_limit(cluster_cpus=100) == 100 * (64 << 20)
    monkeypatch.setattr(ingest, "BACKLOG_BYTES_PER_CPU", None)
    assert backlog_limit(cluster_cpus=100) is None  # Ray Data's own budget
