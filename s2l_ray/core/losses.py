"""Per-example response loss under several checkpoints: the math of the trajectories stage.

Ray-free. The loss of one example is HF's `model(ids, labels=labels).loss` on a one-example batch:
the mean token cross-entropy over the response tokens (positions >= n_prompt), logits at position
p predicting token p+1. Three things make it fast without changing the value:

* No attention mask. Batches are right-padded and attention is causal, so a real token never sees
  the padding after it; leaving the mask out lets SDPA take its fused `is_causal` kernel.
* No (B, L, V) logits. Only the K positions whose next token is a response token go through the
  output head, in chunks of `chunk_rows`, so at most (chunk_rows, V) float32 logits exist at once.
* No host/device synchronisation inside a window: token selection is computed on the host in
  numpy, each batch crosses in one pinned non-blocking copy, and results come back once.

Rows are scored in length-sorted slices of at most `batch_tokens` padded tokens (`plan_batches`).
`score_block` is the actor's whole job on one Ray Data block (a pyarrow table): each `group` in it
is one window, sorted by (n_tokens, id), so which rows share a slice depends on the group's rows
only, never on their order in the block: the same group gives bitwise the same losses.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

PAD_MULTIPLE = 8  # padded lengths are multiples of 8: tensor-core friendly, shapes repeat
LOGIT_BYTES = 256 * 2**20  # float32 logits held at once by the chunked head (per chunk)


def padded(n: int, multiple: int = PAD_MULTIPLE) -> int:
    return -(-n // multiple) * multiple


def plan_batches(lengths: Sequence[int], batch_tokens: int,
                 multiple: int = PAD_MULTIPLE) -> list[tuple[int, int]]:
    """[start, end) slices of `lengths` (sorted ascending) with padded length x rows <= budget.

    A row longer than the budget gets a batch of its own. Greedy over sorted lengths: each slice's
    padded length is that of its last (longest) row.
    """
    out: list[tuple[int, int]] = []
    start, n = 0, len(lengths)
    while start < n:
        end = start + 1
        while end < n and padded(int(lengths[end]), multiple) * (end + 1 - start) <= batch_tokens:
            end += 1
        out.append((start, end))
        start = end
    return out


@dataclass
class PackedBatch:
    """One right-padded batch and the positions whose next token is a response token."""

    input_ids: np.ndarray  # (B, L) int64, padding 0 (never attended: causal, right-padded)
    positions: np.ndarray  # (K,) int64, flat b * L + p: hidden state p predicts token p + 1
    targets: np.ndarray  # (K,) int64, the response token at b * L + p + 1
    n_terms: np.ndarray  # (B,) int64, loss terms (response tokens) per row

    @property
    def shape(self) -> tuple[int, int]:
        return self.input_ids.shape  # type: ignore[return-value]


def pack_batch(values: np.ndarray, lengths: np.ndarray, n_prompt: np.ndarray,
               multiple: int = PAD_MULTIPLE) -> PackedBatch:
    """Rows given as concatenated token `values` (sum(lengths),) -> a PackedBatch.

    A row's loss terms are positions p in [max(n_prompt, 1) - 1, length - 2]: the first token has
    no prediction, exactly as in HF's shifted loss.
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    n_prompt = np.asarray(n_prompt, dtype=np.int64)
    b, length = len(lengths), padded(int(lengths.max()), multiple)
    grid = np.arange(length)  # (L,)
    ids = np.zeros((b, length), dtype=np.int64)
    ids[grid < lengths[:, None]] = values  # row-major fill matches the concatenation order
    first = np.maximum(n_prompt, 1) - 1
    sel = (grid >= first[:, None]) & (grid <= lengths[:, None] - 2)  # (B, L)
    positions = np.flatnonzero(sel)
    return PackedBatch(ids, positions, ids.reshape(-1)[positions + 1], sel.sum(axis=1))


def head_of(model: Any) -> tuple[Any, Any]:
    """(backbone, output head) of a HF causal LM whose logits are head(last_hidden_state)."""
    return model.base_model, model.get_output_embeddings()


def response_losses(model: Any, input_ids: Any, positions: Any, targets: Any, n_terms: Any,
                    chunk_rows: int | None = None) -> Any:
    """Mean response-token cross-entropy per row, float32 (B,), on the model's device.

    input_ids (B, L) long; positions/targets (K,) long as in PackedBatch; n_terms (B,) float.
    Runs under the caller's autocast; logits are upcast to float32 chunk by chunk.
    """
    import torch

    backbone, head = head_of(model)
    b, length = input_ids.shape
    with torch.inference_mode():
        hidden = backbone(input_ids=input_ids, use_cache=False).last_hidden_state  # (B, L, H)
        picked = hidden.reshape(b * length, -1).index_select(0, positions)  # (K, H)
        per_token = torch.zeros(b * length, dtype=torch.float32, device=hidden.device)
        # unique indices: index_copy_ is deterministic (an atomic index_add_ is not on GPU)
        per_token.index_copy_(0, positions, token_ce(head, picked, targets, chunk_rows))
        return per_token.view(b, length).sum(dim=1) / n_terms  # (B,)


CE_METHODS = ("auto", "fused", "log_softmax")
_FUSED_CE: dict[str, Any] = {}  # "fn": the compiled cross-entropy, built once per process


def _ce_from_logits(logits: Any, targets: Any) -> Any:
    """logits (c, V) in any float dtype, targets (c,) long -> (c,) float32:
    logsumexp(logits) - logits[target], in float32."""
    import torch

    x = logits.float()  # (c, V)
    return torch.logsumexp(x, -1) - x.gather(1, targets[:, None]).squeeze(1)


def _fused_ce(logits: Any, targets: Any) -> Any | None:
    """`_ce_from_logits` under torch.compile: Inductor fuses the upcast, max, exp, sum and
    log into one reduction that reads the bf16 logits and writes (c,) values. Eager, the same
    math writes (c, V) float32 tensors three or four times (the upcast, log-probabilities or
    the shifted exponentials): measured on an H200 it was the scorer's largest cost after the
    matmuls. None where torch.compile cannot run here (e.g. no Triton): the caller falls back
    to F.cross_entropy."""
    fn = _FUSED_CE.get("fn")
    if fn is False:
        return None
    if fn is None:
        import torch

        # dynamic: the last chunk of a batch has fewer rows; one graph serves them all
        fn = _FUSED_CE["fn"] = torch.compile(_ce_from_logits, dynamic=True)
    try:
        return fn(logits, targets)
    except Exception as e:  # a compiler missing or failing: stay correct, only slower
        import logging

        logging.getLogger(__name__).warning(
            "the fused cross-entropy does not compile here (%s: %s); using F.cross_entropy",
            type(e).__name__, str(e)[:200])
        _FUSED_CE["fn"] = False
        return None


def token_ce(head: Any, picked: Any, targets: Any, chunk_rows: int | None = None,
             ce: str = "auto") -> Any:
    """Cross-entropy of head(picked) against targets, float32 (K,): the output head runs on
    chunks of `chunk_rows` rows, so at most (chunk_rows, V) float32 logits exist at once.

    picked (K, H) hidden states, targets (K,) long. Runs under the caller's autocast.
    ce: "log_softmax" is F.cross_entropy on the float32 logits; "fused" is the same value from
    a compiled reduction that never writes a (c, V) tensor (`_fused_ce`); "auto" takes "fused"
    on CUDA and "log_softmax" elsewhere (CPU results stay bitwise as the selection digest tests
    pin them, and CPU runs need no compiler).
    """
    import torch
    import torch.nn.functional as F

    if ce not in CE_METHODS:
        raise ValueError(f"ce must be one of {CE_METHODS}, got {ce!r}")
    fused = ce == "fused" or (ce == "auto" and picked.is_cuda)
    if chunk_rows is None:
        chunk_rows = max(1, LOGIT_BYTES // (4 * head.weight.shape[0]))
    parts = []
    for s in range(0, picked.shape[0], chunk_rows):
        logits, tgt = head(picked[s:s + chunk_rows]), targets[s:s + chunk_rows]  # (c, V), (c,)
        out = _fused_ce(logits, tgt) if fused else None
        parts.append(out if out is not None else
                     F.cross_entropy(logits.float(), tgt, reduction="none"))  # (c,)
    if not parts:
        return torch.zeros(0, dtype=torch.float32, device=picked.device)
    return torch.cat(parts) if len(parts) > 1 else parts[0]


def head_path_check(model: Any, length: int = 24, n_prompt: int = 8) -> tuple[float, float]:
    """(response_losses, HF's model(..., labels).loss) on one synthetic example, float32.

    They agree for every model whose logits are head(last hidden state); a model that scales or
    soft-caps its logits would be scored wrongly by the fast path, and this tells.
    """
    import torch

    from s2l_ray.core.tokens import labels_for

    vocab = model.get_input_embeddings().num_embeddings
    ids = [(7 * k + 3) % vocab for k in range(length)]
    pb = pack_batch(np.array(ids), np.array([length]), np.array([n_prompt]))
    t = {k: torch.from_numpy(getattr(pb, k)) for k in ("input_ids", "positions", "targets")}
    ours = response_losses(model, t["input_ids"], t["positions"], t["targets"],
                           torch.from_numpy(pb.n_terms).float())
    with torch.inference_mode():
        hf = model(input_ids=torch.tensor([ids]), labels=torch.tensor([labels_for(ids, n_prompt)]))
    return float(ours[0]), float(hf.loss)


@dataclass
class ScoreStats:
    examples: int = 0
    tokens: int = 0  # real tokens
    padded_tokens: int = 0  # B x L summed over batches
    response_tokens: int = 0
    batches: int = 0
    seconds_per_checkpoint: list[float] = field(default_factory=list)

    def add(self, other: ScoreStats) -> None:
        for k in ("examples", "tokens", "padded_tokens", "response_tokens", "batches"):
            setattr(self, k, getattr(self, k) + getattr(other, k))
        mine, theirs = self.seconds_per_checkpoint, other.seconds_per_checkpoint
        self.seconds_per_checkpoint = [a + b for a, b in zip(mine or [0.0] * len(theirs),
                                                             theirs)]


def autocast_dtype(dtype: str, on_gpu: bool) -> Any:
    """None (no autocast) or the torch dtype to autocast to; 'auto' is bf16 on GPU only.
    'bf16-weights' autocasts nothing: the weights themselves are bf16 (`weights_dtype`)."""
    import torch

    if dtype == "bf16" or (dtype == "auto" and on_gpu):
        return torch.bfloat16
    return None


def weights_dtype(dtype: str) -> Any:
    """The dtype the scoring models' weights are cast to: bf16 for 'bf16-weights' (no fp32
    residual stream, no per-op casts: half the activation traffic of autocast), else float32."""
    import torch

    return torch.bfloat16 if dtype == "bf16-weights" else torch.float32


def scoring_dtype(dtype: str, on_gpu: bool) -> str:
    """trajectories.dtype with 'auto' resolved: 'bf16-weights' on GPU, 'fp32' on CPU. On a GPU
    the reference checkpoints are bf16 already (DeepSpeed's bf16 engine saves them so), and
    bf16 weights scored 1.18-1.21x the rate of autocast on an H200 (less memory traffic: no
    float32 residual stream, no per-op casts)."""
    if dtype != "auto":
        return dtype
    return "bf16-weights" if on_gpu else "fp32"


def compute_dtype_name(dtype: str, on_gpu: bool) -> str:
    """'bf16' where matmuls run in bf16 (autocast or bf16 weights), else 'fp32'."""
    return "bf16" if dtype == "bf16-weights" or autocast_dtype(dtype, on_gpu) is not None \
        else "fp32"


def score_sorted(models: Sequence[Any], values: np.ndarray, lengths: np.ndarray,
                 n_prompt: np.ndarray, batch_tokens: int, device: Any,
                 amp_dtype: Any = None, chunk_rows: int | None = None
                 ) -> tuple[np.ndarray, np.ndarray, ScoreStats]:
    """Every row under every model: (losses (N, T) float32, n_terms (N,), stats).

    Rows must come sorted by length (ascending), their tokens concatenated in `values`. Each batch
    crosses to the device once and goes through all T models before the next one is packed.
    """
    import torch

    on_gpu = torch.device(device).type == "cuda"
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    stats = ScoreStats(seconds_per_checkpoint=[0.0] * len(models))
    results, n_terms_all, keep = [], [], []  # keep: pinned buffers alive until the copies land
    events: list[tuple[int, Any, Any]] = []
    amp = (torch.autocast(torch.device(device).type, dtype=amp_dtype) if amp_dtype is not None
           else contextlib.nullcontext())
    with torch.inference_mode(), amp:
        for s, e in plan_batches(lengths, batch_tokens):
            pb = pack_batch(values[offsets[s]:offsets[e]], lengths[s:e], n_prompt[s:e])
            k = len(pb.positions)
            # one host buffer [ids | positions | targets | n_terms] -> one transfer
            host = torch.from_numpy(np.concatenate(
                [pb.input_ids.ravel(), pb.positions, pb.targets, pb.n_terms]))
            if on_gpu:
                host = host.pin_memory()
                keep.append(host)
            dev = host.to(device, non_blocking=True)
            n_ids = pb.input_ids.size
            ids = dev[:n_ids].view(pb.shape)
            pos, tgt = dev[n_ids:n_ids + k], dev[n_ids + k:n_ids + 2 * k]
            terms = dev[n_ids + 2 * k:].float()
            row = []
            for t, model in enumerate(models):
                if on_gpu:
                    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(
                        enable_timing=True)
                    start.record()
                    row.append(response_losses(model, ids, pos, tgt, terms, chunk_rows))
                    end.record()
                    events.append((t, start, end))
                else:
                    t0 = time.perf_counter()
                    row.append(response_losses(model, ids, pos, tgt, terms, chunk_rows))
                    stats.seconds_per_checkpoint[t] += time.perf_counter() - t0
            results.append(torch.stack(row, dim=1))  # (B, T)
            n_terms_all.append(pb.n_terms)
            stats.batches += 1
            stats.padded_tokens += pb.input_ids.size
            stats.response_tokens += k
    losses = torch.cat(results).float().cpu().numpy() if results else np.zeros(
        (0, len(models)), np.float32)  # the one synchronisation
    for t, start, end in events:
        stats.seconds_per_checkpoint[t] += start.elapsed_time(end) / 1000.0
    stats.examples, stats.tokens = len(lengths), int(offsets[-1])
    n_terms = np.concatenate(n_terms_all) if n_terms_all else np.zeros(0, np.int64)
    return losses, n_terms, stats


def output_schema(n_checkpoints: int) -> Any:
    import pyarrow as pa

    return pa.schema([("id", pa.string()), ("source", pa.string()),
                      ("n_response_tokens", pa.int32()),
                      ("losses", pa.list_(pa.float32(), n_checkpoints))])


def score_block(models: list[Any], block: Any, batch_tokens: int, device: Any,
                amp: Any = None, scorer: Any = None) -> tuple[Any, ScoreStats]:
    """The actor's work on one block (pyarrow, with `group`): each group sorted by (n_tokens,
    id) is one window for `score_sorted`, or for `scorer(values, lengths, n_prompt)` when given
    (e.g. `core.packed_loss.PackedScorer.score_sorted`, same contract). Returns (output table,
    ScoreStats)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    n_ckpt = len(models)
    total = ScoreStats(seconds_per_checkpoint=[0.0] * n_ckpt)
    parts = [output_schema(n_ckpt).empty_table()]
    for g in sorted(pc.unique(block["group"]).to_pylist()):
        rows = block.filter(pc.equal(block["group"], g)).sort_by(
            [("n_tokens", "ascending"), ("id", "ascending")])
        window = (pc.list_flatten(rows["input_ids"]).to_numpy(),
                  pc.list_value_length(rows["input_ids"]).to_numpy(),
                  rows["n_prompt_tokens"].to_numpy())
        losses, n_terms, stats = (scorer(*window) if scorer is not None else score_sorted(
            models, *window, batch_tokens, device, amp))
        total.add(stats)
        parts.append(pa.table({
            "id": rows["id"], "source": rows["source"].cast(pa.string()),
            "n_response_tokens": pa.array(n_terms, pa.int32()),
            "losses": pa.FixedSizeListArray.from_arrays(
                pa.array(losses.reshape(-1), pa.float32()), n_ckpt),
        }, schema=output_schema(n_ckpt)))
    return pa.concat_tables(parts), total
