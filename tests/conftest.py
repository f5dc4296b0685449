"""Shared fixtures: one local Ray per test session, offline tiny models, config builders."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from s2l_ray.config import S2LConfig, load_config

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a test that reaches for the hub fails loudly
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")


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
    """A config writing under tmp_path, using a prebuilt tiny model for every model key."""
    return load_config(None, [f"run.output_dir={tmp_path / 'out'}", f"reference.model={model}",
                              f"target.model={model}", *overrides])
