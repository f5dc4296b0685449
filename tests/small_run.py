"""A small real run up to `select`, made once per test session and shared by the tests that only
read a run (the HTML report, bring-your-own checkpoints): the demo data as a JSONL file plus rows
planted with HTML/JS in their text, a real ingest, T reference checkpoints made directly (the
tiny model with seeded noise, as in test_trajectories: no training), and the real trajectories,
cluster and select stages on the session's local Ray. No sweep: a report must work without one.
"""

from __future__ import annotations

import json
from pathlib import Path

from s2l_ray.config import S2LConfig, load_config

# Planted in instructions and sources: if any of it ran, the page's title or body would change.
PLANTED = [
    "<script>document.title='PWNED'</script>",
    "<img src=x onerror=\"document.body.setAttribute('data-pwned','img')\">",
    "</td></tr></table><script>document.body.setAttribute('data-pwned','break')</script>",
]


def small_run_cfg(out: Path, model: str, data: Path, *extra: str) -> S2LConfig:
    return load_config(None, [
        f"run.output_dir={out}", f"reference.model={model}", f"target.model={model}",
        f"data.source={data / 'train.jsonl'}", f"data.eval_source={data / 'test.jsonl'}",
        "data.template=plain", "data.max_length=128", "reference.num_checkpoints=3",
        "trajectories.batch_tokens=256", "trajectories.cpus_per_actor=0.5", "cluster.k=4",
        "cluster.num_workers=1", "select.budget=0.2", *extra])


def write_planted_data(folder: Path, n_train: int = 240) -> Path:
    from s2l_ray.demo.data import write_mathmix

    write_mathmix(folder, n_train=n_train, n_test_per_source=2, seed=0)
    with open(folder / "train.jsonl", "a", encoding="utf-8") as f:
        for i, text in enumerate(PLANTED):
            f.write(json.dumps({"instruction": f"{text} What is {i} + 1?",
                                "output": f"{i} + 1 = {i + 1}. The answer is {i + 1}",
                                "source": text if i == 0 else "planted"}) + "\n")
    return folder


def make_small_run(root: Path, model: str) -> S2LConfig:
    """ingest -> (T direct checkpoints as train_ref) -> trajectories -> cluster -> select."""
    from s2l_ray.stages.ingest import run_ingest
    from s2l_ray.stages.select import run_select
    from tests.test_trajectories import _publish_ref

    cfg = small_run_cfg(root / "out", model, write_planted_data(root / "data"))
    run_ingest(cfg)
    _publish_ref(cfg, model)
    run_select(cfg)
    return cfg
