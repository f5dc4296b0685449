"""The GPU path, once each: collected always, skipped without CUDA (tests/conftest.py).

Run on a GPU machine with `pytest -m gpu` (scripts/gpu_check.sh does, then the benchmarks):
  * reference fine-tune: Ray Train + DeepSpeed, bf16, 1 GPU, NCCL;
  * trajectories: every scorer on CUDA in bf16 equals HF's one-example loss within bf16
    tolerance, and is bitwise stable across runs and block layouts;
  * k-means: the GPU faiss index where this faiss has one, else the path the stage takes,
    within 2% of faiss.Kmeans' objective;
  * a tiny end-to-end `s2l demo` run (every stage, a 2-trial sweep) on the GPU.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.lm_models import scorer_block

pytestmark = pytest.mark.gpu
REPO = Path(__file__).resolve().parents[1]
VOCAB = 1021


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


DEV = "cuda" if _cuda() else "cpu"  # cpu only under S2L_GPU_TESTS_ON_CPU=1 (a dry run)


def _model(seed: int, hidden: int = 128, layers: int = 2, heads: int = 4):
    import torch
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(seed)
    cfg = GPTNeoXConfig(vocab_size=VOCAB, hidden_size=hidden, num_hidden_layers=layers,
                        num_attention_heads=heads, intermediate_size=4 * hidden,
                        rotary_pct=0.25, max_position_embeddings=1024, tie_word_embeddings=False,
                        initializer_range=0.1)  # larger weights than default: peaked logits
    return GPTNeoXForCausalLM(cfg).eval().to(DEV)


def _window(n: int = 48, seed: int = 0) -> tuple[list[list[int]], list[int]]:
    rng = np.random.default_rng(seed)
    lengths = sorted(rng.integers(4, 400, size=n).tolist())
    return ([rng.integers(2, VOCAB, size=k).tolist() for k in lengths],
            [int(rng.integers(1, k)) for k in lengths])


def _hf(model, ids, n_prompt, amp) -> np.ndarray:
    import contextlib

    import torch

    from s2l_ray.core.tokens import labels_for

    ctx = torch.autocast(DEV, dtype=torch.bfloat16) if amp else contextlib.nullcontext()
    with torch.inference_mode(), ctx:
        return np.array([float(model(input_ids=torch.tensor([r], device=DEV),
                                     labels=torch.tensor([labels_for(r, p)], device=DEV)).loss)
                         for r, p in zip(ids, n_prompt)])


def _scorers(models, batch_tokens: int):
    """name -> scorer for score_block (None = the padded default)."""
    import torch

    from s2l_ray.core.packed_loss import PackedScorer

    amp = torch.bfloat16
    return {"padded": None,
            "packed-varlen": PackedScorer(models, DEV, batch_tokens, attention="varlen",
                                          amp_dtype=amp).score_sorted,
            "packed-mask": PackedScorer(models, DEV, batch_tokens, attention="mask",
                                        row_tokens=512, amp_dtype=amp).score_sorted}


def _run_blocks(models, blocks, batch_tokens, scorer, amp: bool = True) -> dict[str, bytes]:
    import torch

    from s2l_ray.core.losses import score_block

    out = {}
    for b in blocks:
        table, _ = score_block(models, b, batch_tokens, torch.device(DEV),
                               torch.bfloat16 if amp else None, scorer)
        for i, losses in zip(table["id"].to_pylist(), table["losses"].to_pylist()):
            out[i] = np.array(losses, np.float32).tobytes()
    return out


def test_cuda_varlen_kernel_is_used() -> None:
    """Where torch has varlen_attn, the packed scorer's 'auto' attention takes it on CUDA."""
    from s2l_ray.core.packed_loss import _torch_varlen, auto_attention

    if DEV == "cuda":
        assert auto_attention("cuda") == ("varlen" if _torch_varlen() is not None else "mask")
    assert auto_attention("cpu") == "varlen"


@pytest.mark.skipif(DEV != "cuda", reason="the fused varlen kernel exists on CUDA only")
def test_packed_scorer_under_bf16_autocast_never_falls_back_to_the_loop(monkeypatch) -> None:
    """Under autocast GPT-NeoX's rotary leaves q/k in fp32: the scorer must still take the
    fused kernel (the per-sequence loop made it 0.37x a padded HF loop on an H200)."""
    from s2l_ray.core import packed_loss

    if packed_loss._torch_varlen() is None:
        pytest.skip("this torch has no varlen_attn")

    def loop(*a, **kw):
        raise AssertionError("the per-sequence SDPA fallback ran on CUDA under autocast")

    monkeypatch.setattr(packed_loss, "_per_sequence_sdpa", loop)
    models = [_model(0)]
    ids, n_prompt = _window()
    block = scorer_block(ids, n_prompt, [f"e{i:03d}" for i in range(len(ids))], [0] * len(ids))
    _run_blocks(models, [block], 4096, _scorers(models, 4096)["packed-varlen"])


def test_trajectories_on_gpu_equal_hf_one_example_loss() -> None:
    models = [_model(0), _model(1)]
    ids, n_prompt = _window()
    names = [f"e{i:03d}" for i in range(len(ids))]
    block = scorer_block(ids, n_prompt, names, [0] * len(ids))
    ref_bf16 = np.stack([_hf(m, ids, n_prompt, amp=True) for m in models], axis=1)
    ref_fp32 = np.stack([_hf(m, ids, n_prompt, amp=False) for m in models], axis=1)
    assert np.abs(ref_bf16 - ref_fp32).max() < 0.1  # the tolerance below is bf16's, not looser
    for name, scorer in _scorers(models, 4096).items():
        got = _run_blocks(models, [block], 4096, scorer)
        ours = np.stack([np.frombuffer(got[n], np.float32) for n in names])
        np.testing.assert_allclose(ours, ref_bf16, rtol=2e-2, atol=2e-2, err_msg=name)
        np.testing.assert_allclose(ours, ref_fp32, rtol=3e-2, atol=3e-2, err_msg=name)


def test_bf16_weights_equal_hf_one_example_loss_of_the_bf16_model() -> None:
    """trajectories.dtype=bf16-weights: the packed scorer on bf16 weights (no autocast) equals
    HF's one-example loss of the same bf16 model, and stays near the float32 loss."""
    import torch

    from s2l_ray.core.losses import weights_dtype
    from s2l_ray.core.packed_loss import PackedScorer

    fp32 = [_model(0), _model(1)]
    models = [m.to(weights_dtype("bf16-weights")) for m in (_model(0), _model(1))]
    assert all(p.dtype == torch.bfloat16 for m in models for p in m.parameters())
    ids, n_prompt = _window()
    names = [f"e{i:03d}" for i in range(len(ids))]
    block = scorer_block(ids, n_prompt, names, [0] * len(ids))
    ref = np.stack([_hf(m, ids, n_prompt, amp=False) for m in models], axis=1)
    ref_fp32 = np.stack([_hf(m, ids, n_prompt, amp=False) for m in fp32], axis=1)
    for name, scorer in {"padded": None, "packed-varlen": PackedScorer(
            models, DEV, 4096, attention="varlen").score_sorted}.items():
        got = _run_blocks(models, [block], 4096, scorer, amp=False)
        ours = np.stack([np.frombuffer(got[n], np.float32) for n in names])
        np.testing.assert_allclose(ours, ref, rtol=2e-2, atol=2e-2, err_msg=name)
        np.testing.assert_allclose(ours, ref_fp32, rtol=6e-2, atol=6e-2, err_msg=name)


@pytest.mark.parametrize("name", ["padded", "packed-varlen", "packed-mask"])
def test_trajectories_on_gpu_bitwise_stable_across_runs_and_layouts(name: str) -> None:
    models = [_model(0), _model(1)]
    ids, n_prompt = _window(60, seed=1)
    names = [f"e{i:03d}" for i in range(len(ids))]
    rng = np.random.default_rng(2)
    groups = rng.integers(0, 3, size=len(ids)).tolist()
    scorer = _scorers(models, 2048)[name]
    whole = _run_blocks(models, [scorer_block(ids, n_prompt, names, groups)], 2048, scorer)
    order = rng.permutation(len(ids))
    shuffled = _run_blocks(models, [scorer_block([ids[i] for i in order],
                                                 [n_prompt[i] for i in order],
                                                 [names[i] for i in order],
                                                 [groups[i] for i in order])], 2048, scorer)
    members = [[i for i in range(len(ids)) if groups[i] == g] for g in range(3)]
    split = _run_blocks(models, [scorer_block([ids[i] for i in m], [n_prompt[i] for i in m],
                                              [names[i] for i in m], [g] * len(m))
                                 for g, m in enumerate(members)], 2048, scorer)
    again = _run_blocks(models, [scorer_block(ids, n_prompt, names, groups)], 2048, scorer)
    assert whole == shuffled == split == again


def test_kmeans_on_gpu_within_2pct_of_faiss() -> None:
    """fit_shards with the stage's index choice (GPU faiss when this faiss build has it)."""
    import faiss

    from s2l_ray.core import kmeans as km

    rng = np.random.default_rng(4)
    centers = rng.normal(0, 3, size=(16, 10))
    x = (centers[rng.integers(0, 16, 20000)] + rng.normal(0, 1, (20000, 10))).astype(np.float32)
    ids = [f"r{i}" for i in range(len(x))]
    bounds = np.linspace(0, len(x), 3).astype(int)
    shards = [km.Shard(ids[a:b], x[a:b], gpu=None) for a, b in itertools.pairwise(bounds)]
    gpu_index = hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0
    assert (not isinstance(shards[0].index(), faiss.IndexFlat)) == gpu_index

    res = km.fit_shards(km.LocalShards(shards), 16, seed=123, max_iter=15, tol=0)
    ref = faiss.Kmeans(10, 16, niter=15, seed=123, max_points_per_centroid=len(x))
    ref.train(x)
    assert km.objective(x, res.centroids) <= 1.02 * km.objective(x, ref.centroids)


def demo_overrides(out: Path, gpu: bool = True) -> list[str]:
    """The GPU demo's config; gpu=False is the same run on CPU (dry runs, config checks)."""
    on = "true" if gpu else "false"
    return [f"run.output_dir={out}", "demo.n_train=240", "demo.n_test_per_source=2",
            "data.max_length=128", "reference.model=tiny:micro", "target.model=tiny:micro",
            "reference.num_workers=1", f"reference.use_gpu={on}",
            f"reference.precision={'bf16' if gpu else 'fp32'}",
            "reference.batch_size=8", "reference.max_steps=12", "reference.zero_stage=2",
            "reference.num_checkpoints=3", "reference.lr=3e-3", f"trajectories.use_gpu={on}",
            "trajectories.batch_tokens=2048", "cluster.k=4", "cluster.num_workers=1",
            "target.num_workers=1", f"target.use_gpu={on}", "target.batch_size=8",
            "target.max_steps=6", "target.num_checkpoints=1", "target.zero_stage=2",
            "eval.max_new_tokens=8", "sweep.methods=[s2l,random]", "sweep.budgets=[0.3]",
            "sweep.seeds=[0]"]


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`s2l demo` in a fresh process (its own local Ray, which sees the GPU)."""
    out = tmp_path_factory.mktemp("gpu_demo") / "out"
    # scripts/gpu_check.sh sets S2L_GPU_LOG_DIR to its $OUT: the demo's log comes back with
    # the results even when the step runs out of time (pytest prints nothing until then).
    log = Path(os.environ.get("S2L_GPU_LOG_DIR") or out.parent) / "gpu_demo.log"
    with log.open("wb") as f:
        proc = subprocess.run([sys.executable, "-m", "s2l_ray", "demo",
                               *demo_overrides(out, DEV == "cuda")],
                              cwd=REPO, stdout=f, stderr=subprocess.STDOUT, timeout=420)
    assert proc.returncode == 0, log.read_text()[-4000:]
    return out


def test_reference_finetune_deepspeed_bf16_on_gpu(demo_run: Path) -> None:
    """train-ref ran Ray Train + DeepSpeed in bf16 on the GPU: checkpoints load, loss falls."""
    report = json.loads((demo_run / "train_ref" / "report.json").read_text())
    manifest = report["checkpoints"]
    assert len(manifest) == 3
    assert manifest[-1]["train_loss"] < manifest[0]["train_loss"]
    assert all(np.isfinite(m["probe_loss"]) for m in manifest)
    # the DeepSpeed bf16 engine trains (and so saves) bf16 weights: the checkpoint says so
    from safetensors import safe_open

    path = demo_run / "train_ref" / manifest[-1]["path"] / "model.safetensors"
    with safe_open(str(path), framework="pt") as f:
        dtypes = {str(f.get_tensor(k).dtype) for k in list(f.keys())[:4]}
    assert dtypes == {"torch.bfloat16" if DEV == "cuda" else "torch.float32"}, dtypes


def test_end_to_end_demo_with_sweep_on_gpu(demo_run: Path) -> None:
    traj = json.loads((demo_run / "trajectories" / "report.json").read_text())
    assert (traj["device"], traj["compute_dtype"]) == (
        ("GPU", "bf16") if DEV == "cuda" else ("CPU", "fp32"))
    assert traj["nonfinite_losses"] == 0
    import pyarrow.parquet as pq

    results = pq.read_table(demo_run / "sweep" / "results.parquet").to_pylist()
    assert sorted(r["method"] for r in results) == ["random", "s2l"]
    assert all(r["steps"] >= 1 for r in results)
