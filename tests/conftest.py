"""Shared fixtures: one local Ray per test session, offline tiny models, the one config builder
(`overrides`), one small upstream run (ingest + train-ref + trajectories) published once per
session (`upstream`) that tests copy (`copy_upstream`) and run the later stages on, and one
reduced `s2l demo` run (`demo_run`: the whole pipeline with its Tune sweep), read by the demo's
and the sweep's tests."""

from __future__ import annotations

import contextlib
import io
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from s2l_ray.config import S2LConfig, load_config

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a test that reaches for the hub fails loudly
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
# Ray Train's controller takes a worker's report (a queue of one) when it polls, every 2 s by
# default: a worker that reports each step waits up to 2 s per step, which made the tests'
# tiny trainings take ~2.4 s a step. Every Ray these tests start (in-process, `ray start`, the
# pipelines run as subprocesses) inherits this environment.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")


def _has_cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:
        return False


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # S2L_GPU_TESTS_ON_CPU=1 (scripts/gpu_check.sh --dry-run): run the gpu tests' code on CPU,
    # to catch their silly mistakes before a GPU machine is spent on them
    if _has_cuda() or os.environ.get("S2L_GPU_TESTS_ON_CPU") == "1":
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def ray_local():
    """A real local Ray with 2 CPUs, shared by every Ray test in the session."""
    import ray

    from s2l_ray.runtime import init_ray

    if not ray.is_initialized():
        init_ray(num_cpus=2)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def models_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def tiny_ref(models_cache: Path) -> str:
    """An offline tiny Pythia-shaped model + tokenizer folder (loads with from_pretrained)."""
    from s2l_ray.models.tiny import resolve_model

    return resolve_model("tiny:nano", models_cache)


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_ref: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_ref)


def make_cfg(tmp_path: Path, model: str, *overrides: str) -> S2LConfig:
    """A config writing under tmp_path/out, using a prebuilt tiny model for every model key
    (and the defaults for everything else)."""
    return load_config(None, [f"run.output_dir={tmp_path / 'out'}", f"reference.model={model}",
                              f"target.model={model}", *overrides])


# The small run: the demo data at 300 examples, 1 reference worker trained for 12 steps (of
# the epoch's 37: each step costs seconds on 2 CPUs, and 12 already lower the loss clearly),
# 3 checkpoints, 4 clusters, a target fine-tune of a few steps. Sized for a 2-CPU machine (Ray
# Data keeps 1 CPU).
SMALL_RUN = (
    "demo.n_train=300", "demo.n_test_per_source=3", "data.template=plain", "data.max_length=128",
    "reference.num_workers=1", "reference.cpus_per_worker=0.5", "reference.batch_size=8",
    "reference.grad_accum=1", "reference.epochs=1", "reference.max_steps=12", "reference.lr=3e-3",
    "reference.zero_stage=1", "reference.num_checkpoints=3", "trajectories.cpus_per_actor=0.5",
    "cluster.k=4", "cluster.num_workers=1", "target.num_workers=1",
    "target.cpus_per_worker=0.5", "target.batch_size=8", "target.grad_accum=1",
    "target.epochs=1", "target.lr=3e-3", "target.zero_stage=1", "target.num_checkpoints=1",
    "eval.max_new_tokens=12", "eval.cpus=1")


def overrides(out: Path, model: str, *extra: str) -> list[str]:
    """The one override builder: run.output_dir, every model key on `model` (a prebuilt tiny
    model), the small run's sizes, then `extra` (later keys win)."""
    return [f"run.output_dir={out}", f"reference.model={model}", f"target.model={model}",
            *SMALL_RUN, *extra]


def small_cfg(out: Path, model: str, *extra: str) -> S2LConfig:
    return load_config(None, overrides(out, model, *extra))


UPSTREAM = ("ingest", "train_ref", "trajectories")  # the folders `upstream` publishes


@pytest.fixture(scope="session")
def upstream(tmp_path_factory: pytest.TempPathFactory, ray_local, tiny_ref: str) -> Path:
    """The small run's ingest + train-ref + trajectories, published once per test session.
    Read-only: copy it (`copy_upstream`) before running anything on it."""
    from s2l_ray.stages.registry import run_stage

    out = tmp_path_factory.mktemp("upstream") / "out"
    run_stage(small_cfg(out, tiny_ref), "trajectories")
    return out


def copy_upstream(upstream: Path, out: Path, names: tuple[str, ...] = UPSTREAM) -> Path:
    """A private copy of the published upstream stages (`names`: folder names, by default all
    three) in `out` (a new run.output_dir): a config with the small run's data, reference and
    trajectories sections finds them done."""
    for name in names:
        shutil.copytree(upstream / name, out / name)
    return out


@pytest.fixture(scope="session")
def small_run(tmp_path_factory: pytest.TempPathFactory, ray_local, tiny_ref: str) -> S2LConfig:
    """A small real run up to select, with HTML planted in its data (tests/small_run.py)."""
    from tests.small_run import make_small_run

    return make_small_run(tmp_path_factory.mktemp("small_run"), tiny_ref)


# `s2l demo` at a reduced size: the packaged demo config (pre-trained tiny models), 240 examples,
# S2L and random at one budget plus all data: 3 sweep trials, 2 at a time as the demo runs them.
DEMO_RUN = ("demo.n_train=240", "demo.n_test_per_source=2", "reference.epochs=1",
            "target.epochs=1", "reference.num_checkpoints=3", "cluster.k=4",
            "sweep.budgets=[0.5,1.0]")
DEMO_PRETRAIN_STEPS = 10  # the demo's pre-training, shortened: the tests check the plumbing


@contextlib.contextmanager
def demo_models(cache: Path) -> Any:
    """The demo's tiny pre-trained models built in `cache` (S2L_RAY_CACHE) with the shortened
    pre-training, as the demo run was; everything restored on exit."""
    from s2l_ray.models.tiny import PRETRAIN

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("S2L_RAY_CACHE", str(cache))
        for preset in PRETRAIN:
            mp.setitem(PRETRAIN, preset, {**PRETRAIN[preset], "steps": DEMO_PRETRAIN_STEPS})
        yield


@dataclass(frozen=True)
class DemoRun:
    cfg: S2LConfig  # the config `s2l demo` ran with
    out: Path  # its run.output_dir
    cache: Path  # its model cache (S2L_RAY_CACHE)
    rc: int  # the command's exit code
    printed: str  # what it wrote to stdout


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory: pytest.TempPathFactory, ray_local) -> DemoRun:
    """`s2l demo` (the CLI's main, in this process, on the session's Ray) with DEMO_RUN, once
    per test session. Read-only: the sweep's tests rerun or re-report it, nothing more."""
    from s2l_ray import api
    from s2l_ray.cli import main

    root = tmp_path_factory.mktemp("demo")
    out, cache = root / "demo", root / "cache"
    args = [f"run.output_dir={out}", *DEMO_RUN]
    printed = io.StringIO()
    with demo_models(cache), contextlib.redirect_stdout(printed):
        rc = main(["demo", *args])
    return DemoRun(api.load("demo", args), out, cache, rc, printed.getvalue())
