"""The trajectory loss math, without Ray: HF's own one-example loss, batched, padded, chunked."""

from __future__ import annotations

import copy
import itertools

import numpy as np
import pytest
import torch

from s2l_ray.core.losses import (
    compute_dtype_name,
    pack_batch,
    padded,
    plan_batches,
    response_losses,
    score_block,
    score_sorted,
    scoring_dtype,
    token_ce,
    weights_dtype,
)
from s2l_ray.core.tokens import labels_for
from tests.lm_models import llama, neox

VOCAB = 301  # not a multiple of anything: chunk edges land mid-row


@pytest.fixture(scope="module")
def models() -> list[torch.nn.Module]:
    return [neox(VOCAB), llama(VOCAB)]


@pytest.fixture(scope="module")
def rows() -> tuple[list[list[int]], list[int]]:
    """Lengths 3..90 (sorted, as the stage hands them over), prompts from 1 token to most."""
    rng = np.random.default_rng(0)
    lengths = sorted(rng.integers(3, 91, size=23).tolist())
    ids = [rng.integers(2, VOCAB, size=n).tolist() for n in lengths]
    n_prompt = [int(rng.integers(1, n)) for n in lengths]  # >= 1 response token
    return ids, n_prompt


def _hf_one_at_a_time(model: torch.nn.Module, ids: list[list[int]],
                      n_prompt: list[int]) -> np.ndarray:
    out = []
    with torch.no_grad():
        for r, npr in zip(ids, n_prompt):
            x = torch.tensor([r])
            y = torch.tensor([labels_for(r, npr)])
            out.append(float(model(input_ids=x, labels=y).loss))
    return np.array(out, dtype=np.float32)


def _ours(models, ids, n_prompt, batch_tokens, chunk_rows=None):
    values = np.concatenate([np.asarray(r, np.int64) for r in ids])
    lengths = np.array([len(r) for r in ids])
    return score_sorted(models, values, lengths, np.array(n_prompt), batch_tokens,
                        torch.device("cpu"), chunk_rows=chunk_rows)


def test_plan_batches_respects_the_token_budget() -> None:
    lengths = [3, 5, 8, 9, 17, 40, 41, 300]
    plan = plan_batches(lengths, 64)
    assert plan[0][0] == 0 and plan[-1][1] == len(lengths)
    assert all(a[1] == b[0] for a, b in itertools.pairwise(plan))  # contiguous, nothing skipped
    for s, e in plan:
        assert e - s == 1 or padded(lengths[e - 1]) * (e - s) <= 64
    assert plan[-1] == (7, 8)  # longer than the budget: a batch of its own
    assert plan_batches([], 64) == []


def test_pack_batch_selects_response_predictions() -> None:
    pb = pack_batch(np.array([10, 11, 12, 13, 20, 21, 22]), np.array([4, 3]), np.array([2, 1]))
    assert pb.shape == (2, 8)
    assert pb.input_ids[0, :5].tolist() == [10, 11, 12, 13, 0]
    # row 0: prompt 10 11, response 12 13 -> positions 1, 2 predict 12, 13
    # row 1: prompt 20, response 21 22 -> positions 0, 1 predict 21, 22
    assert pb.positions.tolist() == [1, 2, 8, 9]
    assert pb.targets.tolist() == [12, 13, 21, 22]
    assert pb.n_terms.tolist() == [2, 2]


@pytest.mark.parametrize("batch_tokens", [64, 256, 100_000])
def test_equals_hf_loss_one_example_at_a_time(models, rows, batch_tokens: int) -> None:
    ids, n_prompt = rows
    losses, n_terms, stats = _ours(models, ids, n_prompt, batch_tokens)
    assert losses.shape == (len(ids), len(models)) and losses.dtype == np.float32
    assert n_terms.tolist() == [len(r) - p for r, p in zip(ids, n_prompt)]
    for t, model in enumerate(models):
        np.testing.assert_allclose(losses[:, t], _hf_one_at_a_time(model, ids, n_prompt),
                                   rtol=0, atol=1e-5)
    assert stats.examples == len(ids) and stats.tokens == sum(map(len, ids))
    assert stats.padded_tokens >= stats.tokens and len(stats.seconds_per_checkpoint) == 2
    if batch_tokens == 100_000:
        assert stats.batches == 1  # everything padded to the longest row: padding in play


def test_equals_hf_batched_with_attention_mask(models, rows) -> None:
    """Leaving the mask out of a right-padded causal batch changes nothing for real tokens."""
    from s2l_ray.core.tokens import pad_batch

    ids, n_prompt = rows
    x, mask, labels = pad_batch(ids, n_prompt, pad_id=0)
    model = models[0]
    with torch.no_grad():
        logits = model(input_ids=x, attention_mask=mask).logits.float()  # (B, L, V)
    ce = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), labels[:, 1:],
                                           reduction="none")  # (B, L-1), 0 where ignored
    expected = (ce.sum(1) / (labels[:, 1:] != -100).sum(1)).numpy()
    losses, _, _ = _ours(models[:1], ids, n_prompt, 100_000)
    np.testing.assert_allclose(losses[:, 0], expected, rtol=0, atol=1e-5)


def test_chunk_size_does_not_change_the_result(models, rows) -> None:
    ids, n_prompt = rows
    ref, _, _ = _ours(models, ids, n_prompt, 256)
    for chunk in (1, 7, 64):
        got, _, _ = _ours(models, ids, n_prompt, 256, chunk_rows=chunk)
        np.testing.assert_allclose(got, ref, rtol=0, atol=1e-6)


def test_same_batch_same_bits(models, rows) -> None:
    ids, n_prompt = rows
    a, _, _ = _ours(models, ids, n_prompt, 256)
    b, _, _ = _ours(models, ids, n_prompt, 256)
    assert np.array_equal(a, b)


def test_response_losses_direct_call(models) -> None:
    pb = pack_batch(np.arange(2, 14), np.array([5, 7]), np.array([2, 3]))
    t = {k: torch.from_numpy(getattr(pb, k)) for k in ("input_ids", "positions", "targets")}
    out = response_losses(models[0], t["input_ids"], t["positions"], t["targets"],
                          torch.from_numpy(pb.n_terms).float(), chunk_rows=3)
    hf = _hf_one_at_a_time(models[0], [list(range(2, 7)), list(range(7, 14))], [2, 3])
    np.testing.assert_allclose(out.numpy(), hf, rtol=0, atol=1e-5)


def test_bf16_autocast_is_close(models, rows) -> None:
    ids, n_prompt = rows
    values = np.concatenate([np.asarray(r, np.int64) for r in ids])
    lengths = np.array([len(r) for r in ids])
    ref, _, _ = _ours(models, ids, n_prompt, 256)
    got, _, _ = score_sorted(models, values, lengths, np.array(n_prompt), 256,
                             torch.device("cpu"), amp_dtype=torch.bfloat16)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, ref, rtol=0.02, atol=0.05)


@pytest.mark.parametrize("chunk", [None, 5])
def test_token_ce_fused_equals_log_softmax(chunk) -> None:
    """The CUDA default ('fused': a compiled logsumexp - target logit, no (c, V) tensor
    written) gives F.cross_entropy's value; checked here on CPU, where 'auto' keeps
    log_softmax. Where this machine cannot compile, 'fused' falls back and still agrees."""
    torch.manual_seed(0)
    head = torch.nn.Linear(16, VOCAB, bias=False)
    picked, targets = torch.randn(23, 16) * 3, torch.randint(0, VOCAB, (23,))
    with torch.inference_mode():
        ref = torch.nn.functional.cross_entropy(head(picked), targets, reduction="none")
        fused = token_ce(head, picked, targets, chunk, ce="fused")
        auto = token_ce(head, picked, targets, chunk)
    np.testing.assert_allclose(fused.numpy(), ref.numpy(), rtol=0, atol=1e-5)
    assert torch.equal(auto, token_ce(head, picked, targets, chunk, ce="log_softmax"))
    with pytest.raises(ValueError, match="ce must be one of"):
        token_ce(head, picked, targets, ce="fast")


def test_bf16_weights_policy(models, rows) -> None:
    """trajectories.dtype=bf16-weights: weights cast to bf16, no autocast; close to float32."""
    assert [scoring_dtype("auto", gpu) for gpu in (True, False)] == ["bf16-weights", "fp32"]
    assert scoring_dtype("bf16", True) == "bf16"
    assert weights_dtype("bf16-weights") == torch.bfloat16
    assert weights_dtype("auto") == weights_dtype("bf16") == torch.float32
    assert [compute_dtype_name(d, False) for d in ("auto", "fp32", "bf16", "bf16-weights")] == [
        "fp32", "fp32", "bf16", "bf16"]
    ids, n_prompt = rows
    ref, _, _ = _ours(models, ids, n_prompt, 256)
    got, _, _ = _ours([copy.deepcopy(m).to(weights_dtype("bf16-weights")) for m in models],
                      ids, n_prompt, 256)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, ref, rtol=0.03, atol=0.08)


def test_score_block_ignores_row_order(models, rows) -> None:
    """Two groups, rows shuffled: same output table bit for bit, the HF losses, every id once."""
    import pyarrow as pa

    ids, n_prompt = rows
    names = [f"ex{i:02d}" for i in range(len(ids))]
    block = pa.table({
        "id": names, "source": ["s"] * len(ids),
        "input_ids": pa.array(ids, pa.list_(pa.int32())),
        "n_prompt_tokens": pa.array(n_prompt, pa.int32()),
        "n_tokens": pa.array([len(r) for r in ids], pa.int32()),
        "group": pa.array([i % 2 for i in range(len(ids))], pa.int64())})
    out, stats = score_block(models, block, 128, torch.device("cpu"))
    perm = np.random.default_rng(1).permutation(len(ids))
    again, _ = score_block(models, block.take(perm), 128, torch.device("cpu"))
    assert out.sort_by("id").equals(again.sort_by("id"))
    assert out.schema.field("losses").type == pa.list_(pa.float32(), len(models))
    assert sorted(out["id"].to_pylist()) == names and stats.examples == len(ids)
    got = np.array(out.sort_by("id")["losses"].to_pylist())
    for t, model in enumerate(models):
        np.testing.assert_allclose(got[:, t], _hf_one_at_a_time(model, ids, n_prompt), atol=1e-5)
