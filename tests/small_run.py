"""A small real run up to `select`, made once per test session and shared by the tests that only
read a run (the HTML report, bring-your-own checkpoints): the demo data as a JSONL file plus rows
planted with HTML/JS in their text, a real ingest, T reference checkpoints made directly (the
tiny model with seeded noise: no training), and the real trajectories,
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


def perturbed_checkpoint(model: str, out: Path, seed: int, tokenizer: str | None = None) -> None:
    """The tiny model with seeded noise on every weight (none for seed 0): a stand-in for a
    training checkpoint, saved with `tokenizer` (default: the model's own)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    net = AutoModelForCausalLM.from_pretrained(model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * seed * torch.randn(p.shape, generator=gen))
    net.save_pretrained(str(out))
    AutoTokenizer.from_pretrained(tokenizer or model).save_pretrained(str(out))


def publish_checkpoints(cfg: S2LConfig, model: str, t: int = 3) -> list[Path]:
    """A published train_ref stage with t checkpoints at steps 10, 20, ..., as run_train_ref
    would leave it."""
    from s2l_ray.stages.registry import stage_for

    stage = stage_for(cfg, "train-ref")
    tmp = stage.begin()
    manifest = []
    for i in range(t):
        rel = f"checkpoints/step_{10 * (i + 1):07d}"
        perturbed_checkpoint(model, tmp / rel, seed=i)
        manifest.append({"index": i, "step": 10 * (i + 1), "epoch": 0, "train_loss": 1.0,
                         "probe_loss": 1.0, "lr": 1e-3, "attempt_start_step": 0, "path": rel})
    (tmp / "manifest.json").write_text(json.dumps(manifest))
    stage.publish({"checkpoints": manifest})
    return [stage.path / m["path"] for m in manifest]


def make_small_run(root: Path, model: str) -> S2LConfig:
    """ingest -> (T direct checkpoints as train_ref) -> trajectories -> cluster -> select."""
    from s2l_ray.stages.registry import run_stage

    cfg = small_run_cfg(root / "out", model, write_planted_data(root / "data"))
    run_stage(cfg, "ingest")
    publish_checkpoints(cfg, model)
    run_stage(cfg, "select")
    return cfg
