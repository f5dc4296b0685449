"""The packed scorer equals HF's one-example loss, and is bitwise stable across layouts."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from s2l_ray.core import packed_loss
from s2l_ray.core.losses import score_block
from s2l_ray.core.packed_loss import (
    PackedScorer,
    build_pack,
    plan_packs,
    segment_means,
)
from s2l_ray.core.tokens import labels_for
from tests.lm_models import llama, neox, scorer_block

VOCAB = 301


@pytest.fixture(scope="module")
def models() -> list[torch.nn.Module]:
    return [neox(VOCAB), llama(VOCAB)]


@pytest.fixture(scope="module")
def window() -> tuple[list[list[int]], list[int]]:
    """Lengths 3..90 sorted (as a group hands them over), prompts 1 token to nearly all."""
    rng = np.random.default_rng(0)
    lengths = sorted(rng.integers(3, 91, size=23).tolist())
    ids = [rng.integers(2, VOCAB, size=n).tolist() for n in lengths]
    n_prompt = [int(rng.integers(1, n)) for n in lengths]
    return ids, n_prompt


def _hf(model: torch.nn.Module, ids: list[list[int]], n_prompt: list[int]) -> np.ndarray:
    with torch.inference_mode():
        return np.array([float(model(input_ids=torch.tensor([r]),
                                     labels=torch.tensor([labels_for(r, p)])).loss)
                         for r, p in zip(ids, n_prompt)])


def _score(scorer: PackedScorer, ids: list[list[int]], n_prompt: list[int]) -> np.ndarray:
    losses, _, _ = scorer.score_sorted(np.concatenate(ids), np.array([len(r) for r in ids]),
                                       np.array(n_prompt))
    return losses


@pytest.mark.parametrize("attention", ["varlen", "mask"])
@pytest.mark.parametrize("batch_tokens", [64, 200, 100_000])
def test_equals_hf_one_example_loss(models, window, attention, batch_tokens) -> None:
    """fp32 on CPU: every example, both model families, one to many sequences per batch."""
    ids, n_prompt = window
    for model in models:
        ours = _score(PackedScorer([model], "cpu", batch_tokens, attention=attention,
                                   row_tokens=96), ids, n_prompt)[:, 0]
        np.testing.assert_allclose(ours, _hf(model, ids, n_prompt), rtol=1e-5, atol=1e-5)
        assert model.config._attn_implementation == "sdpa"  # restored after scoring


def test_varlen_really_attends_per_sequence(models, window, monkeypatch) -> None:
    """Our attention function runs (HF's own sdpa would also be right, by its packed-mask
    detection): count its per-sequence calls, and break it to see the losses move."""
    ids, n_prompt = window
    calls: list[int] = []
    real = packed_loss._per_sequence_sdpa

    def counting(q, k, v, cu, scale):
        calls.append(len(cu) - 1)
        return real(q, k, v, cu, scale)

    monkeypatch.setattr(packed_loss, "_per_sequence_sdpa", counting)
    scorer = PackedScorer([models[0]], "cpu", 100_000, attention="varlen")
    good = _score(scorer, ids, n_prompt)
    assert calls == [len(ids) + 1] * 2  # 2 layers; 23 sequences + the padding tail

    def one_segment(q, k, v, cu, scale):  # attention across sequences: must change losses
        return real(q, k, v, torch.tensor([0, q.shape[1]]), scale)

    monkeypatch.setattr(packed_loss, "_per_sequence_sdpa", one_segment)
    bad = _score(scorer, ids, n_prompt)
    assert np.abs(bad - good).max() > 1e-3


def test_several_checkpoints_in_one_pass(models, window) -> None:
    ids, n_prompt = window
    other = neox(VOCAB)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.01 * torch.randn_like(p))
    ours = _score(PackedScorer([models[0], other], "cpu", 300), ids, n_prompt)
    np.testing.assert_allclose(ours[:, 1], _hf(other, ids, n_prompt), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(ours[:, 0], _score(PackedScorer([models[0]], "cpu", 300),
                                                     ids, n_prompt)[:, 0])


@pytest.mark.parametrize("attention", ["varlen", "mask"])
def test_bitwise_stable_across_runs_and_block_layouts(models, window, attention) -> None:
    """Same groups in one block, in reversed order, or one block per group: same bits."""
    ids, n_prompt = window
    rng = np.random.default_rng(3)
    names = [f"e{i:03d}" for i in range(len(ids))]
    groups = rng.integers(0, 3, size=len(ids)).tolist()
    scorer = PackedScorer(models, "cpu", 160, attention=attention, row_tokens=96).score_sorted

    def run(blocks):
        out = {}
        for b in blocks:
            table, _ = score_block(models, b, 160, "cpu", None, scorer)
            out.update(zip(table["id"].to_pylist(), table["losses"].to_pylist()))
        return out

    whole = run([scorer_block(ids, n_prompt, names, groups)])
    order = rng.permutation(len(ids))
    shuffled = run([scorer_block([ids[i] for i in order], [n_prompt[i] for i in order],
                                 [names[i] for i in order], [groups[i] for i in order])])
    members = [[i for i in range(len(ids)) if groups[i] == g] for g in range(3)]
    split = run([scorer_block([ids[i] for i in m], [n_prompt[i] for i in m],
                              [names[i] for i in m], [g] * len(m))
                 for g, m in enumerate(members)])
    again = run([scorer_block(ids, n_prompt, names, groups)])
    for other in (shuffled, split, again):
        assert other.keys() == whole.keys()
        for k in whole:
            assert np.array(other[k], np.float32).tobytes() == \
                np.array(whole[k], np.float32).tobytes()


def test_plan_packs_covers_every_row_once() -> None:
    lengths = sorted(np.random.default_rng(1).integers(1, 300, size=200).tolist())
    for row_tokens in (None, 64, 512):
        plan = plan_packs(lengths, 1024, row_tokens)
        flat = [i for batch in plan for row in batch for i in row]
        assert flat == list(range(len(lengths)))
        cap = 1024 if row_tokens is None else max(row_tokens, 304)
        for batch in plan:
            assert len(batch) <= max(1, 1024 // cap)
            for row in batch:
                assert len(row) == 1 or sum(lengths[i] for i in row) <= cap


def test_build_pack_layout_and_fixed_shape() -> None:
    values = np.arange(1, 11)  # rows of 3, 4, 3 tokens
    offsets = np.array([0, 3, 7, 10])
    pk = build_pack(values, offsets, np.array([1, 2, 3]), [[0, 1], [2]], row_len=8, n_rows=3)
    assert pk.shape == (3, 8)
    assert pk.input_ids[0].tolist() == [1, 2, 3, 4, 5, 6, 7, 0]
    assert pk.position_ids[0].tolist() == [0, 1, 2, 0, 1, 2, 3, 0]
    assert pk.position_ids[2].tolist() == list(range(8))
    # loss terms: sequence 0 (prompt 1) at 0, 1; sequence 1 (prompt 2) at 3 + 1, 3 + 2;
    # sequence 2 (3 tokens, prompt 3) has no response token
    assert pk.positions.tolist() == [0, 1, 4, 5]
    assert pk.targets.tolist() == [2, 3, 6, 7]
    assert pk.n_terms.tolist() == [2, 2, 0]
    assert pk.cu_seqlens.tolist() == [0, 3, 7, 8, 11, 16, 24]
    with pytest.raises(ValueError, match="does not fit"):
        build_pack(values, offsets, np.array([1, 2, 3]), [[0, 1, 2]], row_len=8)


def test_segment_means_empty_is_nan() -> None:
    out = segment_means(np.array([1.0, 3.0, 5.0]), np.array([2, 0, 1]))
    assert out[0] == 2.0 and np.isnan(out[1]) and out[2] == 5.0


@pytest.mark.parametrize("dynamic", [True, False])
def test_compiled_scorer_equals_hf(models, window, dynamic) -> None:
    """torch.compile of the backbone (trajectories.compile): for any batch length (dynamic, as
    the stage compiles) or padded to one shape (reduce-overhead's CUDA graphs need one); the
    padding never changes a loss."""
    ids, n_prompt = window
    scorer = PackedScorer([models[0]], "cpu", 200, compile_mode="default", dynamic=dynamic)
    np.testing.assert_allclose(_score(scorer, ids, n_prompt)[:, 0], _hf(models[0], ids, n_prompt),
                               rtol=1e-5, atol=1e-5)
    _, _, stats = scorer.score_sorted(np.concatenate(ids), np.array([len(r) for r in ids]),
                                      np.array(n_prompt))
    # padded: every batch is 200 tokens (one shape); dynamic: only each batch's own tokens
    assert (stats.padded_tokens == stats.batches * 200) != dynamic
