"""The stage registry: each stage declared once; the runner's plan and the fingerprint chain."""

from __future__ import annotations

import pytest

from s2l_ray.config import ConfigError, load_config
from s2l_ray.stages import registry


def names(specs) -> list[str]:
    return [s.name for s in specs]


def test_a_stage_needs_only_its_upstream() -> None:
    assert names(registry.plan("select")) == ["ingest", "train-ref", "trajectories", "cluster",
                                              "select"]
    assert names(registry.plan("sweep")) == ["ingest", "train-ref", "trajectories", "cluster",
                                             "sweep"]  # not select
    assert names(registry.plan("ingest")) == ["ingest"]
    assert names(registry.plan(*registry.BY_NAME)) == names(registry.STAGES)
    with pytest.raises(ConfigError, match="unknown stage 'selct'.*Fix"):
        registry.plan("selct")


def test_every_stage_is_declared_once_and_in_order() -> None:
    seen: set[str] = set()
    for s in registry.STAGES:
        assert set(s.needs) <= seen, s.name  # needs come earlier: the runner's order works
        seen.add(s.name)
        assert callable(s.function("run"))
        if s.check:
            assert callable(s.function("check"))
    assert len({s.folder for s in registry.STAGES}) == len(registry.STAGES)


def test_fingerprints_follow_the_sections_and_the_upstream(tmp_path) -> None:
    def fps(*extra: str) -> dict[str, str]:
        cfg = load_config(None, [f"run.output_dir={tmp_path}", *extra])
        return {n: st.fingerprint for n, st in registry.stages(cfg, *registry.BY_NAME).items()}

    base = fps()
    k = fps("cluster.k=7")  # cluster and what reads it change; the upstream does not
    assert [n for n in base if base[n] != k[n]] == ["cluster", "select", "sweep"]
    budget = fps("select.budget=0.3")
    assert [n for n in base if base[n] != budget[n]] == ["select"]
    noise = fps("select.noise_cap=true")  # an option the sweep's trials inherit
    assert [n for n in base if base[n] != noise[n]] == ["select", "sweep"]
    seed = fps("run.seed=1")  # the seed enters at train-ref
    assert [n for n in base if base[n] != seed[n]] == ["train-ref", "trajectories", "cluster",
                                                       "select", "sweep"]
    assert fps("run.overwrite=true") == base  # how to run is not what is computed
